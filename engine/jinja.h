/*
 * jinja.h — a Jinja2 template interpreter (prefix jj_): the language that
 * Hugging Face chat templates are written in, rendered the way transformers'
 * apply_chat_template renders them (jinja2's ImmutableSandboxedEnvironment
 * with trim_blocks, lstrip_blocks, the loopcontrols and {% generation %}
 * extensions, and transformers' tojson, raise_exception, strftime_now,
 * namespace and dict).  docs/tokenizer.md lists what is covered.
 *
 * The module is lexer -> parser -> AST (jinja_parse.c) and an evaluator over
 * a small value type (jinja_eval.c, jinja_builtins.c, jinja_value.c).  It
 * has no global state: a parsed jj_template is read-only and may be rendered
 * by any number of threads at once.  Every render is bounded (output bytes,
 * memory, evaluation steps, call depth; jj_limits), so a hostile template or
 * input cannot hang the caller or exhaust its memory.
 *
 * Trust: every string carries the byte ranges that came from the caller's
 * data (untrusted) rather than from the template text or from values the
 * caller marks trusted; the rendered text reports them (jj_result), so a
 * tokenizer can refuse to read special tokens out of a user's message.
 *
 * Status codes: 0 ok, negative JJ_E*.  Errors fill (err, errlen) with one
 * line; template errors start with "line N: ".
 */
#ifndef MKAD_JINJA_H
#define MKAD_JINJA_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

enum {
    JJ_OK = 0,
    JJ_ESYNTAX = -1,  /* the template does not parse, or uses a construct we do not implement */
    JJ_ERUNTIME = -2, /* an error while rendering (undefined attribute, type error, ...) */
    JJ_ERAISE = -3,   /* the template called raise_exception(message): err holds the message */
    JJ_ELIMIT = -4,   /* a jj_limits bound was reached */
    JJ_ENOMEM = -5,   /* allocation failed */
    JJ_EINVAL = -6    /* bad argument from the caller */
};

typedef struct jj_template jj_template;

/* Parses a template.  *out owns it; free with jj_template_free.  On
 * JJ_ESYNTAX err reads "line N: ..." (N counts from 1 in src). */
int jj_parse(const char *src, size_t len, jj_template **out, char *err, size_t errlen);
void jj_template_free(jj_template *t);

/* 1 when the template runs a for loop over some value's `content` member
 * (`for part in message['content']`): it expects OpenAI-style content parts
 * rather than a string (the test vLLM uses to pick a content format). */
int jj_template_iterates_content(const jj_template *t);

/* ---- variables ---------------------------------------------------------- */

typedef struct jj_vars jj_vars;

int jj_vars_create(jj_vars **out);
void jj_vars_free(jj_vars *v);

/* Decides whether a string inside JSON data is trusted: key is the object
 * member it is the value of (NULL for array elements and the top level). */
typedef int (*jj_trust_fn)(void *ctx, const char *key, const char *s, size_t len);

/* Sets the template variable `name` (copied) to a JSON value (a reference is
 * taken).  Its strings are untrusted unless trust (may be NULL) says so;
 * trust_ctx must stay valid while v is rendered.  A later set of the same
 * name replaces the earlier one. */
int jj_vars_set_json(jj_vars *v, const char *name, json_t *value, jj_trust_fn trust, void *trust_ctx);
/* A string variable (copied), trusted or not. */
int jj_vars_set_string(jj_vars *v, const char *name, const char *s, size_t len, int trusted);

/* ---- rendering ---------------------------------------------------------- */

typedef struct jj_limits {
    size_t max_output;  /* bytes of rendered text (default 64 MiB) */
    size_t max_memory;  /* bytes the evaluator allocates in all (default 512 MiB) */
    uint64_t max_steps; /* evaluation steps (default 50 million, well under a second of work) */
    int max_depth;      /* nested macro calls and recursive loops (default 64) */
} jj_limits;

typedef struct jj_render_params {
    jj_limits limits;
    int64_t now;        /* strftime_now's clock in seconds since the epoch (local time);
                           0: the current time */
} jj_render_params;

jj_render_params jj_default_render_params(void);

/* Byte range [start, end) of the output. */
typedef struct jj_span {
    size_t start, end;
} jj_span;

typedef struct jj_result {
    char *text;         /* NUL-terminated, len bytes */
    size_t len;
    jj_span *untrusted; /* sorted, disjoint ranges that came from untrusted data */
    size_t n_untrusted;
} jj_result;

/* Renders t with the variables v (NULL: none) and p (NULL: defaults).  On
 * success *out holds the text; free it with jj_result_free.  On failure out
 * is zeroed and err says why. */
int jj_render(const jj_template *t, const jj_vars *v, const jj_render_params *p, jj_result *out,
              char *err, size_t errlen);
void jj_result_free(jj_result *r);

#endif /* MKAD_JINJA_H */
