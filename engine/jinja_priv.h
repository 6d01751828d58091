/*
 * jinja_priv.h — the Jinja interpreter's private declarations: the arena,
 * the value type, the AST, and the evaluator state shared by jinja_*.c.
 * Nothing outside engine/jinja_*.c includes this header.
 */
#ifndef MKAD_JINJA_PRIV_H
#define MKAD_JINJA_PRIV_H

#include <locale.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "jinja.h"

/* ---- arena (jinja_value.c) ------------------------------------------------
 * Everything one parse or one render allocates lives in one arena, freed in
 * one call; a render's arena counts its bytes against jj_limits.max_memory. */

typedef struct jj_arena {
    struct jj_chunk *head;
    size_t used;       /* bytes handed out plus chunk headers */
    size_t limit;      /* 0: none */
    void (*fail)(void *ctx, int status); /* called on exhaustion; must not return */
    void *fail_ctx;
} jj_arena;

void *jj__alloc(jj_arena *a, size_t n);        /* zeroed, 16-byte aligned; fails through a->fail */
char *jj__strndup(jj_arena *a, const char *s, size_t n);
void jj__arena_free(jj_arena *a);

/* ---- values ---------------------------------------------------------------- */

enum {
    JV_UNDEF, JV_NONE, JV_BOOL, JV_INT, JV_FLOAT, JV_STR,
    JV_LIST,  /* list or tuple (tuple flag) */
    JV_DICT,  /* ordered mapping, immutable */
    JV_NS,    /* namespace(): a mapping whose attributes templates may assign */
    JV_FUNC,  /* builtin function, bound method, macro, loop object's calls */
    JV_LOOP   /* the `loop` variable of a for loop */
};

typedef struct jj_str jj_str;
typedef struct jj_list jj_list;
typedef struct jj_dict jj_dict;
typedef struct jj_func jj_func;
typedef struct jj_loop jj_loop;

/* What a JV_LIST is in Python: they iterate alike but print, compare,
 * serialise and answer len() and [] differently.  jinja2's map, select,
 * reject, selectattr, rejectattr, unique and items filters return
 * generators (always true; no len(); not JSON), dict.items()/keys()/
 * values() views, range() a range. */
enum { JL_LIST, JL_TUPLE, JL_GEN, JL_ITEMS, JL_KEYS, JL_VALUES, JL_RANGE };

typedef struct jj_val {
    uint8_t t;     /* JV_* */
    uint8_t kind;  /* JV_LIST: JL_*; JV_STR: 1 for Markup (the safe and escape filters'
                      result, which escapes what is added to it) */
    union {
        int b;
        int64_t i;
        double f;
        jj_str *s;       /* JV_STR; JV_UNDEF: the hint for errors, may be NULL */
        jj_list *l;
        jj_dict *d;      /* JV_DICT, JV_NS */
        jj_func *fn;
        jj_loop *loop;
    } u;
} jj_val;

/* Untrusted byte ranges of a string: [a, b). */
typedef struct jj_taint {
    uint32_t a, b;
} jj_taint;

struct jj_str {
    size_t len;        /* bytes */
    size_t ncp;        /* code points (== len: ASCII) */
    uint32_t n_taint;
    jj_taint *taint;   /* sorted, disjoint, merged */
    char s[];          /* UTF-8, NUL-terminated */
};

struct jj_list {
    size_t n;
    jj_val *v;
};

struct jj_dict {
    size_t n, cap;
    jj_val *k, *v;     /* insertion order */
};

/* ---- the AST ------------------------------------------------------------- */

typedef struct jj_node jj_node;

enum {
    /* expressions */
    N_CONST, N_NAME, N_GETATTR, N_GETITEM, N_SLICE, N_CALL, N_FILTER, N_TEST,
    N_NOT, N_NEG, N_POS, N_BIN, N_AND, N_OR, N_COMPARE, N_COND, N_LIST, N_TUPLE, N_DICT,
    /* statements */
    N_DATA, N_OUTPUT, N_IF, N_FOR, N_SET, N_SETATTR, N_SETBLOCK, N_MACRO, N_CALLBLOCK,
    N_FILTERBLOCK, N_WITH, N_BREAK, N_CONTINUE, N_BODY
};

/* N_BIN operators and N_COMPARE operators */
enum { OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_FLOORDIV, OP_MOD, OP_POW, OP_CONCAT };
enum { CMP_EQ, CMP_NE, CMP_LT, CMP_LE, CMP_GT, CMP_GE, CMP_IN, CMP_NOTIN };

typedef struct jj_nodes {
    size_t n;
    jj_node **v;
} jj_nodes;

/* Call arguments: positional args, then kwargs (names[i] for kw[i]). */
typedef struct jj_args {
    jj_nodes pos;
    jj_nodes kw;
    const char **names;
} jj_args;

typedef struct jj_builtin jj_builtin; /* a filter or test (jinja_builtins.c) */

struct jj_node {
    uint16_t kind;
    uint16_t op;     /* N_BIN: OP_*; N_TEST: negated; N_FOR: recursive */
    int line;
    const char *name; /* N_NAME, N_GETATTR, N_FILTER/N_TEST (the name), N_SETATTR (attr), N_MACRO */
    jj_val value;     /* N_CONST; N_DATA (a string) */
    jj_node *a, *b, *c; /* operands; roles per kind are noted in jinja_parse.c */
    jj_nodes list;    /* N_LIST/N_TUPLE/N_DICT items (dict: k0,v0,k1,v1...), N_COMPARE
                         operands after the first, N_IF tests, N_OUTPUT items */
    uint8_t *ops;     /* N_COMPARE: CMP_* per operand in list */
    jj_nodes body;    /* statement bodies; N_IF: body per test (as N_BODY nodes) */
    jj_nodes orelse;  /* else branch */
    jj_args args;     /* N_CALL, N_FILTER, N_TEST, N_CALLBLOCK; N_MACRO: params (kw = defaults) */
    const char **targets; /* N_FOR, N_SET, N_WITH: names assigned (n_targets) */
    size_t n_targets;
    int target_tuple;     /* unpack into targets even if there is one */
    const jj_builtin *fn; /* N_FILTER/N_TEST: resolved at parse time */
};

struct jj_template {
    jj_arena arena;
    jj_nodes body;
    int iterates_content;
};

/* ---- parsing (jinja_lex.c, jinja_parse.c) --------------------------------- */

/* Tokens: template data, tag delimiters, and what is inside tags. */
enum { T_EOF, T_DATA, T_VAR_BEGIN, T_VAR_END, T_BLOCK_BEGIN, T_BLOCK_END, T_NAME, T_STRING, T_INT, T_FLOAT, T_OP };

typedef struct jj_tok {
    int type;
    int line;
    const char *s; /* T_DATA, T_NAME, T_STRING (decoded), T_OP: text */
    size_t len;
    int64_t i;
    double f;
} jj_tok;

/* A parse in progress.  Errors longjmp to jb with status and err set. */
typedef struct jj_parser {
    jj_arena *a;       /* the template's */
    jmp_buf jb;
    int status;
    char *err;
    size_t errlen;
    jj_tok *t;         /* the tokens (jj__lex) */
    size_t nt, cap, i;
    int depth;         /* expression / statement nesting */
    int loops;         /* enclosing for loops (break/continue) */
    int iterates_content;
    jj_template *tpl;
    const char *src;
    size_t src_len;
} jj_parser;

/* Fails the parse with "line N: ..." (jj_parse returns JJ_ESYNTAX). */
_Noreturn void jj__parse_fail(jj_parser *P, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Splits the template text into P->t, ending with T_EOF. */
void jj__lex(jj_parser *P, const char *src, size_t len);

/* ---- evaluator state (jinja_eval.c) -------------------------------------- */

typedef struct jj_scope jj_scope;

/* A string being built: bytes plus untrusted ranges, in the render arena. */
typedef struct jj_sb {
    char *p;
    size_t len, cap;
    jj_taint *t;
    uint32_t nt, capt;
} jj_sb;

typedef struct jj_ev {
    jj_arena arena;
    jmp_buf fail;
    int status;
    char *err;
    size_t errlen;
    int line;          /* the line being evaluated, for messages */
    jj_limits lim;
    uint64_t steps;
    int depth;
    int64_t now;
    jj_scope *root;
    const jj_vars *vars;
    const jj_template *tpl;
    jj_result *result;
    jj_sb *out;        /* where output goes (the top level or a capture) */
    locale_t ctype;    /* C.UTF-8 for case mapping, made on first use; 0: none yet */
    int ctype_tried;
    size_t total_out;  /* bytes written to the top-level output */
} jj_ev;

/* Fails the render: formats the message (prefixed with the line when
 * status is JJ_ERUNTIME) and longjmps out.  Never returns. */
_Noreturn void jj__fail(jj_ev *ev, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void jj__step(jj_ev *ev);

/* ---- values (jinja_value.c) ---------------------------------------------- */

static inline jj_val jj__undef(jj_str *hint) { jj_val v = { .t = JV_UNDEF }; v.u.s = hint; return v; }
static inline jj_val jj__none(void) { jj_val v = { .t = JV_NONE }; return v; }
static inline jj_val jj__bool(int b) { jj_val v = { .t = JV_BOOL }; v.u.b = !!b; return v; }
static inline jj_val jj__int(int64_t i) { jj_val v = { .t = JV_INT }; v.u.i = i; return v; }
static inline jj_val jj__float(double f) { jj_val v = { .t = JV_FLOAT }; v.u.f = f; return v; }
static inline jj_val jj__strv(jj_str *s) { jj_val v = { .t = JV_STR }; v.u.s = s; return v; }

jj_str *jj__str_new(jj_arena *a, const char *s, size_t len, int untrusted);
jj_str *jj__str_fmt(jj_arena *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
jj_val jj__cstr(jj_ev *ev, const char *s); /* a trusted string value */
/* s[a, b) in bytes (on character boundaries), keeping its untrusted ranges. */
jj_str *jj__str_sub(jj_arena *ar, const jj_str *s, size_t a, size_t b);
int jj__str_untrusted(const jj_str *s); /* any untrusted byte */
/* Byte offset of code point index i (0 <= i <= ncp). */
size_t jj__str_cp_off(const jj_str *s, size_t i);
/* Decodes one code point at s[i] (valid UTF-8 assumed); returns its length. */
size_t jj__utf8_dec(const char *s, size_t n, uint32_t *cp);
size_t jj__utf8_enc(uint32_t cp, char *out);
/* Drops an incomplete UTF-8 character that a cut left at the end of s
 * (error messages must stay valid UTF-8: they end up in JSON). */
void jj__utf8_trim_cut(char *s);
/* Length of a Python str.isspace() character at s (0: not whitespace). */
size_t jj__space_len(const char *s, size_t n);

void jj__sb_put(jj_ev *ev, jj_sb *b, const char *s, size_t n, int untrusted);
void jj__sb_puts(jj_ev *ev, jj_sb *b, const char *s);
void jj__sb_str(jj_ev *ev, jj_sb *b, const jj_str *s); /* keeps its ranges */
void jj__sb_taint_all(jj_sb *b, jj_ev *ev);         /* marks everything untrusted */
jj_str *jj__sb_done(jj_ev *ev, jj_sb *b);

jj_list *jj__list_new(jj_ev *ev, size_t n);
jj_val jj__listv(jj_list *l, int kind);
jj_dict *jj__dict_new(jj_ev *ev, size_t cap);
jj_val *jj__dict_find(const jj_dict *d, jj_val key);
jj_val *jj__dict_get_cstr(const jj_dict *d, const char *key);
void jj__dict_set(jj_ev *ev, jj_dict *d, jj_val key, jj_val v);

int jj__truthy(jj_val v);
int jj__equal(jj_val a, jj_val b);
/* Python ordering of a and b (numbers, strings, sequences); fails on others. */
int jj__compare(jj_ev *ev, jj_val a, jj_val b);
const char *jj__type_name(jj_val v); /* Python's name: 'str', 'dict', 'NoneType', ... */
int jj__untrusted_any(jj_val v);       /* any untrusted string inside */

/* markupsafe's escape(): & < > " ' as entities (keeps untrusted ranges). */
jj_str *jj__escape(jj_ev *ev, const jj_str *s);

/* str(v) and repr(v) as Python writes them, appended to b. */
void jj__str_of(jj_ev *ev, jj_sb *b, jj_val v);
void jj__repr_of(jj_ev *ev, jj_sb *b, jj_val v);
jj_str *jj__to_str(jj_ev *ev, jj_val v);
void jj__fmt_float(double f, char *buf, size_t cap); /* Python repr(float) */

/* json.dumps(v, ensure_ascii, indent, separators, sort_keys). indent NULL:
 * none; item_sep/key_sep NULL: Python's defaults for the indent. */
jj_str *jj__tojson(jj_ev *ev, jj_val v, int ensure_ascii, const char *indent, const char *item_sep,
                   const char *key_sep, int sort_keys);
/* JSON value -> value; strings trusted per the callback. */
jj_val jj__from_json(jj_ev *ev, json_t *j, const char *key, jj_trust_fn trust, void *ctx, int depth);

/* Argument checks of builtins: fail with "what, not <type>" otherwise. */
_Noreturn void jj__type_error(jj_ev *ev, const char *what, jj_val v);
const jj_str *jj__need_str(jj_ev *ev, jj_val v, const char *what);
int64_t jj__need_int(jj_ev *ev, jj_val v, const char *what);
jj_val jj__list_of(jj_ev *ev, jj_val *v, size_t n); /* a new list of copies */

/* ---- Python's str operations (jinja_strings.c) ----------------------------- */

int jj__is_alpha_cp(jj_ev *ev, uint32_t c);
/* mode: 'u' upper, 'l' lower, 't' str.title(), 'c' capitalize, 'j' jinja's title filter */
jj_val jj__recase(jj_ev *ev, const jj_str *s, int mode);
/* str.strip(chars) (chars NULL: whitespace), on the left and/or the right */
jj_val jj__strip(jj_ev *ev, const jj_str *s, const jj_str *chars, int left, int right);
/* str.split(sep, maxsplit) / str.rsplit (sep none or undefined: whitespace runs) */
jj_val jj__split(jj_ev *ev, const jj_str *s, jj_val sep, int64_t maxsplit, int from_right);
jj_val jj__splitlines(jj_ev *ev, const jj_str *s, int keepends);
jj_val jj__replace(jj_ev *ev, const jj_str *s, const jj_str *old, const jj_str *new, int64_t count);
int jj__has_prefix(const jj_str *s, const jj_str *p, int suffix);
/* startswith/endswith with a str or a tuple of str */
jj_val jj__starts_ends(jj_ev *ev, const jj_str *s, jj_val arg, int suffix);
/* byte offset of the first (last) occurrence, or -1; jj__byte_to_cp turns it into Python's index */
int64_t jj__find(const jj_str *s, const jj_str *sub, int last);
int64_t jj__byte_to_cp(const jj_str *s, int64_t off);

/* ---- evaluator (jinja_eval.c) -------------------------------------------- */

/* Calls a callable with evaluated arguments (kw names may be NULL). */
jj_val jj__call(jj_ev *ev, jj_val fn, jj_val *pos, size_t npos, const char **kwn, jj_val *kw, size_t nkw);
/* obj.name with the sandbox's attribute-then-item rule. */
jj_val jj__getattr(jj_ev *ev, jj_val obj, const char *name);
jj_val jj__getitem(jj_ev *ev, jj_val obj, jj_val key);
/* Items of an iterable (list, tuple, string characters, dict keys; undefined:
 * none); fails for other values. */
jj_list *jj__iter(jj_ev *ev, jj_val v);

/* ---- filters and builtins (jinja_filters.c, jinja_builtins.c) --------------- */

/* Arguments of a builtin call after binding: up to 8 parameters by name. */
typedef struct jj_bound {
    jj_val v[8];
    int given[8];
    jj_val *rest;       /* extra positional arguments ("*" builtins) */
    size_t nrest;
    const char **kwn;   /* extra keyword arguments ("**" builtins) */
    jj_val *kw;
    size_t nkw;
} jj_bound;

struct jj_builtin {
    const char *name;
    const char *params; /* "a,b=,c=": parameter names, '=' marks an optional one; a final "*"
                           takes extra positionals, "**" extra keywords */
    jj_val (*fn)(jj_ev *ev, jj_val self, jj_bound *a);
};

const jj_builtin *jj__filter_find(const char *name);
/* the items filter: (key, value) tuples of a mapping, as a generator */
jj_val jj__items(jj_ev *ev, jj_val v, jj_bound *a);
const jj_builtin *jj__test_find(const char *name);
/* A test applied by name at run time (select, selectattr, ...). */
int jj__run_test(jj_ev *ev, const char *name, jj_val v, jj_val *args, size_t nargs);
/* Applies a builtin to self with evaluated arguments. */
jj_val jj__apply(jj_ev *ev, const jj_builtin *b, jj_val self, jj_val *pos, size_t npos, const char **kwn,
                 jj_val *kw, size_t nkw);
/* A method of a str/dict/list value, or NULL. */
const jj_builtin *jj__method_find(jj_val self, const char *name);
/* 1 when name is a method that would modify self (list.append, dict.pop,
 * ...), which the immutable sandbox refuses. */
int jj__method_unsafe(jj_val self, const char *name);
/* A global function (range, namespace, dict, raise_exception, strftime_now, ...), or NULL. */
const jj_builtin *jj__global_find(const char *name);

struct jj_func {
    int kind;                 /* FN_BUILTIN (global or method), FN_MACRO, FN_LOOP_CYCLE, ... */
    const jj_builtin *b;
    jj_val self;              /* bound method's object */
    const jj_node *macro;     /* FN_MACRO: the N_MACRO node */
    jj_val caller;            /* FN_MACRO called from a call block: its `caller` */
    const jj_node *callbody;  /* FN_CALLER: the call block whose body it renders */
    jj_scope *scope;          /* FN_CALLER: where the call block stood */
    jj_loop *loop;            /* FN_LOOP_*: the loop */
};
enum { FN_BUILTIN, FN_MACRO, FN_CALLER, FN_LOOP_CYCLE, FN_LOOP_CHANGED, FN_LOOP_RECURSE };

struct jj_loop {
    const jj_node *node;  /* the N_FOR */
    jj_scope *scope;      /* the scope the loop runs in (for loop(...) recursion) */
    jj_list *items;
    size_t i;
    int depth;            /* 1 for the outermost */
    jj_val last_changed;
    int changed_init;
};

#endif /* MKAD_JINJA_PRIV_H */
