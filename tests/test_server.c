/*
 * test_server.c — Check unit tests for the server's pure parts: request
 * validation (api.c), JSON and SSE building, the stop-string scanner, the
 * step planner and session prefix reuse (sched.c).  No sockets, no threads.
 */
#include "config.h"

#include <check.h>
#include <math.h>
#include <stdatomic.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>

#include "srv_internal.h"

static const srv_model_desc MD = { "tiny", 4096, 128, NULL, 16 };

/* Allocation failures on demand: this program is linked with
 * -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc, so the server's and the
 * engine's allocations come here (jansson's and libc's own do not).  When
 * armed, the allocation number `countdown` (0 = the next one) of a size
 * equal to `size` (0 = any size) fails. */
void *__real_malloc(size_t n);
void *__real_calloc(size_t k, size_t n);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t k, size_t n);
void *__wrap_realloc(void *p, size_t n);
static struct {
    atomic_int armed, countdown, failed;
    size_t size;
} FI;

static void fail_alloc(int countdown, size_t size)
{
    FI.size = size;
    atomic_store(&FI.countdown, countdown);
    atomic_store(&FI.failed, 0);
    atomic_store(&FI.armed, 1);
}

static void fail_alloc_off(void)
{
    atomic_store(&FI.armed, 0);
}

static int should_fail(size_t n)
{
    if (!atomic_load(&FI.armed) || (FI.size && n != FI.size)) return 0;
    if (atomic_fetch_sub(&FI.countdown, 1) != 0) return 0;
    atomic_store(&FI.armed, 0);
    atomic_store(&FI.failed, 1);
    return 1;
}

void *__wrap_malloc(size_t n)
{
    return should_fail(n) ? NULL : __real_malloc(n);
}

void *__wrap_calloc(size_t k, size_t n)
{
    return should_fail(k * n) ? NULL : __real_calloc(k, n);
}

void *__wrap_realloc(void *p, size_t n)
{
    return should_fail(n) ? NULL : __real_realloc(p, n);
}

static srv_genreq *parse_ok(const char *body, int chat)
{
    srv_genreq *r = NULL;
    srv_error e;
    int rc = srv_genreq_parse(body, strlen(body), chat, &MD, NULL, &r, &e);
    ck_assert_msg(rc == 0, "parse failed: %s (%s)", e.message, body);
    ck_assert_ptr_nonnull(r);
    return r;
}

/* Expects a failure with `status` naming `param` ("" = null). */
static void parse_bad(const char *body, int chat, int status, const char *param)
{
    srv_genreq *r = NULL;
    srv_error e;
    memset(&e, 0, sizeof e);
    int rc = srv_genreq_parse(body, strlen(body), chat, &MD, NULL, &r, &e);
    ck_assert_msg(rc == -1, "accepted: %s", body);
    ck_assert_ptr_null(r);
    ck_assert_msg(e.status == status, "status %d != %d for %s (%s)", e.status, status, body, e.message);
    ck_assert_msg(strcmp(e.param, param) == 0, "param '%s' != '%s' for %s", e.param, param, body);
    ck_assert_msg(e.message[0] != '\0', "empty message");
}

START_TEST(parse_completion_valid)
{
    srv_genreq *r = parse_ok("{\"model\":\"tiny\",\"prompt\":[1,2,3],\"max_tokens\":5,\"temperature\":0.5,"
                             "\"top_p\":0.9,\"top_k\":40,\"seed\":-7,\"stop\":[\"a\",\"bc\"],\"stream\":true,"
                             "\"stream_options\":{\"include_usage\":true},\"logprobs\":2,\"n\":1,"
                             "\"session_id\":\"s-1\"}", 0);
    ck_assert_int_eq(r->n_prompt, 3);
    ck_assert_int_eq(r->prompt[2], 3);
    ck_assert_int_eq(r->max_tokens, 5);
    ck_assert(r->sp.temperature == 0.5f);
    ck_assert(r->sp.top_p == 0.9f);
    ck_assert_int_eq(r->sp.top_k, 40);
    ck_assert(r->has_seed && r->sp.seed == (uint64_t)-7);
    ck_assert_int_eq(r->n_stop, 2);
    ck_assert(r->stop_len[1] == 2 && memcmp(r->stop[1], "bc", 2) == 0);
    ck_assert(r->stream && r->include_usage);
    ck_assert(r->logprobs && r->top_logprobs == 2);
    ck_assert_str_eq(r->session_id, "s-1");
    ck_assert(r->return_token_ids); /* no tokenizer: ids are returned */
    ck_assert(r->sp.presence_penalty == 0.0f && r->n_bias == 0);
    ck_assert(!r->chat);
    srv_genreq_free(r);
}
END_TEST

static json_t *load(const char *s);

START_TEST(parse_echo)
{
    srv_genreq *r = parse_ok("{\"model\":\"tiny\",\"prompt\":[5,6],\"echo\":true,\"max_tokens\":0,"
                             "\"logprobs\":1}", 0);
    ck_assert(r->echo && r->prompt_logprobs && r->max_tokens == 0);
    ck_assert_str_eq(r->echo_text, "5 6"); /* no tokenizer: ids in decimal */
    srv_genreq_free(r);
    r = parse_ok("{\"model\":\"tiny\",\"prompt\":[5],\"echo\":true}", 0);
    ck_assert(r->echo && !r->prompt_logprobs && r->max_tokens == 16);
    /* the completion text follows the prompt's; the prompt's first logprob is null */
    srv_logprob plp[2] = { { .token = 5, .n_top = -1 }, { .token = 6, .logprob = -2.0f } };
    srv_usage u = { 2, 0, 0 };
    char *s = srv_build_completion(r, "c", 1, &(srv_choice_out){ " 7", 2, NULL, 0, NULL, 0, "length" }, 1, plp, 2, &u);
    json_t *o = load(s);
    json_t *c = json_array_get(json_object_get(o, "choices"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(c, "text")), "5 7");
    ck_assert(json_is_null(json_object_get(c, "logprobs"))); /* logprobs were not asked for */
    json_decref(o);
    free(s);
    r->logprobs = 1;
    s = srv_build_completion(r, "c", 1, &(srv_choice_out){ " 7", 2, NULL, 0, NULL, 0, "length" }, 1, plp, 2, &u);
    o = load(s);
    json_t *l = json_object_get(json_array_get(json_object_get(o, "choices"), 0), "logprobs");
    ck_assert(json_is_null(json_array_get(json_object_get(l, "token_logprobs"), 0)));
    ck_assert(json_is_null(json_array_get(json_object_get(l, "top_logprobs"), 0)));
    ck_assert(json_real_value(json_array_get(json_object_get(l, "token_logprobs"), 1)) == -2.0);
    ck_assert_int_eq(json_integer_value(json_array_get(json_object_get(l, "text_offset"), 1)), 1);
    json_decref(o);
    free(s);
    srv_genreq_free(r);
    parse_bad("{\"model\":\"tiny\",\"prompt\":[5],\"max_tokens\":0}", 0, 400, "max_tokens");
}
END_TEST

START_TEST(parse_penalties_and_bias)
{
    srv_genreq *r = parse_ok("{\"model\":\"tiny\",\"prompt\":[1],\"presence_penalty\":-1.5,"
                             "\"frequency_penalty\":0.5,\"logit_bias\":{\"7\":-100,\"0\":2.5,\"4095\":100}}", 0);
    ck_assert(r->sp.presence_penalty == -1.5f && r->sp.frequency_penalty == 0.5f);
    ck_assert_int_eq(r->n_bias, 3);
    float sum = 0;
    for (int i = 0; i < 3; i++) sum += r->bias[i] * (float)(r->bias_ids[i] + 1);
    ck_assert(sum == -100.0f * 8 + 2.5f * 1 + 100.0f * 4096);
    srv_genreq_free(r);
    r = parse_ok("{\"model\":\"tiny\",\"prompt\":[1],\"logit_bias\":{}}", 0);
    ck_assert_int_eq(r->n_bias, 0);
    srv_genreq_free(r);
}
END_TEST

START_TEST(parse_defaults)
{
    srv_genreq *r = parse_ok("{\"model\":\"tiny\",\"prompt\":[[5,6]]}", 0);
    ck_assert_int_eq(r->max_tokens, 16);      /* completions default */
    ck_assert(!r->max_tokens_auto);
    ck_assert(r->sp.temperature == 1.0f);     /* OpenAI default */
    ck_assert(!r->has_seed && !r->stream && !r->logprobs);
    srv_genreq_free(r);
    /* The default is capped by the context (128). */
    char body[2048] = "{\"model\":\"tiny\",\"prompt\":[";
    for (int i = 0; i < 120; i++) strcat(body, i ? ",1" : "1");
    strcat(body, "]}");
    r = parse_ok(body, 0);
    ck_assert_int_eq(r->max_tokens, 8);
    srv_genreq_free(r);
    /* chat: until the context (or the K/V pool: sched.c) is full */
    r = parse_ok("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
                 "\"prompt_token_ids\":[1,2,3,4]}", 1);
    ck_assert_int_eq(r->max_tokens, 124);
    ck_assert(r->max_tokens_auto);
    ck_assert(r->chat);
    srv_genreq_free(r);
    /* max_completion_tokens wins in chat */
    r = parse_ok("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"x\"}]}],"
                 "\"prompt_token_ids\":[1],\"max_tokens\":9,\"max_completion_tokens\":3,\"logprobs\":true,"
                 "\"top_logprobs\":5}", 1);
    ck_assert_int_eq(r->max_tokens, 3);
    ck_assert(r->logprobs && r->top_logprobs == 5);
    srv_genreq_free(r);
}
END_TEST

START_TEST(parse_session_header)
{
    srv_genreq *r = NULL;
    srv_error e;
    const char *b = "{\"model\":\"tiny\",\"prompt\":[1]}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 0, &MD, "hdr.1", &r, &e), 0);
    ck_assert_str_eq(r->session_id, "hdr.1");
    srv_genreq_free(r);
    const char *b2 = "{\"model\":\"tiny\",\"prompt\":[1],\"session_id\":\"body\"}";
    ck_assert_int_eq(srv_genreq_parse(b2, strlen(b2), 0, &MD, "hdr", &r, &e), 0);
    ck_assert_str_eq(r->session_id, "body"); /* the body wins */
    srv_genreq_free(r);
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 0, &MD, "bad id!", &r, &e), -1);
    ck_assert_int_eq(e.status, 400);
    ck_assert_str_eq(e.param, "X-Session-Id");
}
END_TEST

START_TEST(parse_rejects)
{
    parse_bad("", 0, 400, "");
    parse_bad("{", 0, 400, "");
    parse_bad("[1,2]", 0, 400, "");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"x\":1,\"x\":2}", 0, 400, "");
    parse_bad("{\"prompt\":[1]}", 0, 400, "model");
    parse_bad("{\"model\":7,\"prompt\":[1]}", 0, 400, "model");
    parse_bad("{\"model\":\"other\",\"prompt\":[1]}", 0, 404, "model");
    parse_bad("{\"model\":\"tiny\"}", 0, 400, "prompt");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[]}", 0, 400, "prompt");
    parse_bad("{\"model\":\"tiny\",\"prompt\":\"hello\"}", 0, 400, "prompt");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1,4096]}", 0, 400, "prompt");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1,-1]}", 0, 400, "prompt");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1,2.5]}", 0, 400, "prompt");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[[1],[2]]}", 0, 400, "prompt");
    parse_bad("{\"model\":\"tiny\",\"prompt\":{}}", 0, 400, "prompt");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"temperature\":\"hot\"}", 0, 400, "temperature");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"temperature\":2.5}", 0, 400, "temperature");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"top_p\":0}", 0, 400, "top_p");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"top_k\":-5}", 0, 400, "top_k");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"max_tokens\":-1}", 0, 400, "max_tokens");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"max_tokens\":0}", 0, 400, "max_tokens");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"max_tokens\":1e30}", 0, 400, "max_tokens");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"max_tokens\":99999999999999}", 0, 400, "max_tokens");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"max_tokens\":\"5\"}", 0, 400, "max_tokens");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"max_tokens\":128}", 0, 400, "max_tokens");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"n\":129}", 0, 400, "n");
    /* which choice would continue the session? */
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"n\":2,\"session_id\":\"s\"}", 0, 400, "n");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"n\":3,\"best_of\":2}", 0, 400, "best_of");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"n\":0}", 0, 400, "n");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
              "\"prompt_token_ids\":[1],\"echo\":true}", 1, 400, "echo");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"echo\":1}", 0, 400, "echo");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"best_of\":3}", 0, 400, "best_of");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"presence_penalty\":2.5}", 0, 400, "presence_penalty");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"frequency_penalty\":\"1\"}", 0, 400, "frequency_penalty");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"logit_bias\":[5]}", 0, 400, "logit_bias");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"logit_bias\":{\"4096\":1}}", 0, 400, "logit_bias");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"logit_bias\":{\"05\":1}}", 0, 400, "logit_bias");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"logit_bias\":{\"-1\":1}}", 0, 400, "logit_bias");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"logit_bias\":{\"a\":1}}", 0, 400, "logit_bias");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"logit_bias\":{\"5\":101}}", 0, 400, "logit_bias");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"logit_bias\":{\"5\":\"1\"}}", 0, 400, "logit_bias");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"stream\":\"yes\"}", 0, 400, "stream");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"stream_options\":{\"include_usage\":true}}", 0, 400, "stream_options");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"stream\":true,\"stream_options\":{\"include_usage\":1}}", 0, 400,
              "stream_options.include_usage");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"stop\":5}", 0, 400, "stop");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", 0, 400, "stop");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"logprobs\":6}", 0, 400, "logprobs");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"session_id\":\"\"}", 0, 400, "session_id");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"session_id\":\"a b\"}", 0, 400, "session_id");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"seed\":1.5}", 0, 400, "seed");
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"ignore_eos\":1}", 0, 400, "ignore_eos");
    {
        srv_genreq *r = NULL;
        srv_error e;
        const char nul[] = "{\"model\":\"tiny\",\"prompt\":[1\0,2]}";
        ck_assert_int_eq(srv_genreq_parse(nul, sizeof nul - 1, 0, &MD, NULL, &r, &e), -1);
        ck_assert_int_eq(e.status, 400);
    }
    /* invalid UTF-8 inside a string */
    parse_bad("{\"model\":\"tiny\",\"prompt\":[1],\"user\":\"\xff\xfe\"}", 0, 400, "");
    /* chat */
    parse_bad("{\"model\":\"tiny\"}", 1, 400, "messages");
    parse_bad("{\"model\":\"tiny\",\"messages\":[]}", 1, 400, "messages");
    parse_bad("{\"model\":\"tiny\",\"messages\":[5]}", 1, 400, "messages[0]");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}", 1, 400, "messages[0]");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":5}]}", 1, 400, "messages[0]");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 1, 400, "messages");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"prompt_token_ids\":[1],"
              "\"top_logprobs\":2}", 1, 400, "top_logprobs");
    /* the fields a chat template sees */
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}", 1, 400,
              "messages[0]");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"tool_calls\":[]}]}", 1, 400,
              "messages[0]");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"name\":1}}]}]}",
              1, 400, "messages[0]");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"tool\",\"content\":\"x\",\"tool_call_id\":5}]}", 1, 400,
              "messages[0]");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":{}}", 1, 400, "tools");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"type\":\"function\"}]}",
              1, 400, "tools");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"chat_template_kwargs\":[1]}", 1,
              400, "chat_template_kwargs");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"chat_template\":\"{{x}}\"}", 1,
              400, "chat_template");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"add_generation_prompt\":true,"
              "\"continue_final_message\":true}", 1, 400, "continue_final_message");
    parse_bad("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"prompt_token_ids\":[1],"
              "\"max_completion_tokens\":-3}", 1, 400, "max_completion_tokens");
}
END_TEST

START_TEST(parse_no_tokenizer_message)
{
    srv_genreq *r = NULL;
    srv_error e;
    const char *b = "{\"model\":\"tiny\",\"prompt\":\"Once upon a time\"}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 0, &MD, NULL, &r, &e), -1);
    ck_assert_ptr_nonnull(strstr(e.message, "tokenizer.json"));
    ck_assert_str_eq(e.code, "no_tokenizer");
}
END_TEST

START_TEST(error_object)
{
    srv_error e;
    /* a message cut at the buffer's end never ends inside a UTF-8 character */
    char longmsg[700];
    for (int i = 0; i < 699; i += 3) memcpy(longmsg + i, "\xe2\x82\xac", 3); /* 233 x U+20AC */
    longmsg[699] = 0;
    for (int shift = 0; shift < 3; shift++) {
        srv_error_set(&e, 400, "invalid_request_error", NULL, NULL, "%.*s%s", shift, "xx", longmsg);
        char *js = srv_error_json(&e);
        json_t *jo = json_loads(js, 0, NULL);
        ck_assert_msg(jo != NULL, "shift %d: %s", shift, js);
        ck_assert_ptr_null(strstr(js, "out of memory"));
        json_decref(jo);
        free(js);
    }
    srv_error_set(&e, 400, "invalid_request_error", "temperature", NULL, "bad \"x\" %d", 3);
    char *s = srv_error_json(&e);
    json_error_t je;
    json_t *o = json_loads(s, 0, &je);
    ck_assert_ptr_nonnull(o);
    json_t *err = json_object_get(o, "error");
    ck_assert_str_eq(json_string_value(json_object_get(err, "message")), "bad \"x\" 3");
    ck_assert_str_eq(json_string_value(json_object_get(err, "type")), "invalid_request_error");
    ck_assert_str_eq(json_string_value(json_object_get(err, "param")), "temperature");
    ck_assert(json_is_null(json_object_get(err, "code")));
    json_decref(o);
    free(s);
}
END_TEST

/* Error text is always valid UTF-8 in valid JSON: an invalid byte (a
 * URL-decoded %ff) becomes U+FFFD, a message cut inside a character by its
 * buffer loses the partial character, and a user string quoted into a
 * message is clipped on a character boundary.  None of it is reported as
 * an allocation failure. */
START_TEST(error_object_utf8)
{
    srv_error e;
    srv_error_set(&e, 404, "invalid_request_error", "model", "model_not_found",
                  "The model '%s' does not exist", "\xff\xfex");
    char *s = srv_error_json(&e);
    json_t *o = json_loads(s, 0, NULL);
    ck_assert_msg(o != NULL, "%s", s);
    const char *m = json_string_value(json_object_get(json_object_get(o, "error"), "message"));
    ck_assert_str_eq(m, "The model '\xef\xbf\xbd\xef\xbf\xbdx' does not exist");
    json_decref(o);
    free(s);
    /* 511 bytes of 'a' then a 2-byte character: vsnprintf keeps its first byte */
    char big[520];
    memset(big, 'a', 510);
    strcpy(big + 510, "\xc3\xa9tail");
    srv_error_set(&e, 400, "invalid_request_error", NULL, NULL, "%s", big);
    s = srv_error_json(&e);
    o = json_loads(s, 0, NULL);
    ck_assert_msg(o != NULL, "%s", s);
    m = json_string_value(json_object_get(json_object_get(o, "error"), "message"));
    ck_assert_uint_eq(strlen(m), 510);
    json_decref(o);
    free(s);
    /* clipping a quoted user string: never inside a character */
    char q[16];
    srv_utf8_clip(q, sizeof q, "abcdefghijkl\xc3\xa9xyz", 17);
    ck_assert_str_eq(q, "abcdefghijkl...");
    srv_utf8_clip(q, sizeof q, "ab\xc3\xa9", 4);
    ck_assert_str_eq(q, "ab\xc3\xa9");
    srv_utf8_clip(q, sizeof q, "a\0b", 3);
    ck_assert_str_eq(q, "a");
}
END_TEST

static json_t *load(const char *s)
{
    json_error_t je;
    json_t *o = json_loads(s, 0, &je);
    ck_assert_msg(o != NULL, "invalid JSON: %s: %s", je.text, s);
    return o;
}

/* n > 1: the request keeps n, the body has one choice per index with its
 * own text and finish_reason, and SSE chunks carry their choice's index. */
START_TEST(build_n_choices)
{
    srv_genreq *r = parse_ok("{\"model\":\"tiny\",\"prompt\":[1,2],\"n\":3,\"best_of\":3}", 0);
    ck_assert_int_eq(r->n, 3);
    srv_usage u = { 2, 5, 0 };
    srv_choice_out ch[3] = { { "a", 1, NULL, 0, NULL, 0, "length" }, { "bb", 2, NULL, 0, NULL, 0, "stop" },
                             { "", 0, NULL, 0, NULL, 0, "stop" } };
    char *s = srv_build_completion(r, "cmpl-2", 1, ch, 3, NULL, 0, &u);
    json_error_t je;
    json_t *o = json_loads(s, 0, &je);
    ck_assert_ptr_nonnull(o);
    json_t *cs = json_object_get(o, "choices");
    ck_assert_int_eq(json_array_size(cs), 3);
    for (int i = 0; i < 3; i++) {
        json_t *c = json_array_get(cs, i);
        ck_assert_int_eq(json_integer_value(json_object_get(c, "index")), i);
        ck_assert_str_eq(json_string_value(json_object_get(c, "text")), ch[i].text);
        ck_assert_str_eq(json_string_value(json_object_get(c, "finish_reason")), ch[i].finish);
    }
    json_decref(o);
    free(s);
    srv_buf b = { 0 };
    int32_t t = 5;
    ck_assert_int_eq(srv_sse_chunk(&b, r, "c", 1, 2, "x", 1, &t, 1, NULL, 0, NULL, 1), 0);
    ck_assert_ptr_nonnull(strstr(b.data, "\"index\":2"));
    srv_buf_free(&b);
    srv_genreq_free(r);
}
END_TEST

START_TEST(build_completion_json)
{
    srv_genreq *r = parse_ok("{\"model\":\"tiny\",\"prompt\":[1,2]}", 0);
    int32_t ids[3] = { 7, 8, 9 };
    srv_usage u = { 2, 3, 1 };
    char *s = srv_build_completion(r, "cmpl-1", 123, &(srv_choice_out){ "7 8 9", 5, ids, 3, NULL, 0, "length" }, 1, NULL, 0, &u);
    json_t *o = load(s);
    ck_assert_str_eq(json_string_value(json_object_get(o, "object")), "text_completion");
    ck_assert_str_eq(json_string_value(json_object_get(o, "id")), "cmpl-1");
    ck_assert_int_eq(json_integer_value(json_object_get(o, "created")), 123);
    json_t *c = json_array_get(json_object_get(o, "choices"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(c, "text")), "7 8 9");
    ck_assert_str_eq(json_string_value(json_object_get(c, "finish_reason")), "length");
    ck_assert_int_eq(json_array_size(json_object_get(c, "token_ids")), 3);
    json_t *us = json_object_get(o, "usage");
    ck_assert_int_eq(json_integer_value(json_object_get(us, "total_tokens")), 5);
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(us, "prompt_tokens_details"),
                                                        "cached_tokens")), 1);
    json_decref(o);
    free(s);
    srv_genreq_free(r);

    r = parse_ok("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                 "\"prompt_token_ids\":[1],\"logprobs\":true,\"top_logprobs\":1}", 1);
    srv_logprob lp = { .token = 7, .logprob = -0.5f, .n_top = 1, .top_tokens = { 7 },
                       .top_logprobs = { -0.5f } };
    /* invalid UTF-8 in generated text must still give valid JSON */
    s = srv_build_completion(r, "chatcmpl-1", 1, &(srv_choice_out){ "a\xff" "b", 3, ids, 1, &lp, 1, "stop" }, 1, NULL, 0, &u);
    o = load(s);
    ck_assert_str_eq(json_string_value(json_object_get(o, "object")), "chat.completion");
    c = json_array_get(json_object_get(o, "choices"), 0);
    json_t *msg = json_object_get(c, "message");
    ck_assert_str_eq(json_string_value(json_object_get(msg, "role")), "assistant");
    ck_assert_str_eq(json_string_value(json_object_get(msg, "content")), "a\xef\xbf\xbd" "b");
    json_t *content = json_object_get(json_object_get(c, "logprobs"), "content");
    ck_assert_int_eq(json_array_size(content), 1);
    ck_assert(json_real_value(json_object_get(json_array_get(content, 0), "logprob")) == -0.5);
    json_decref(o);
    free(s);
    srv_genreq_free(r);
}
END_TEST

/* Splits an SSE buffer into its events; checks the framing of each. */
static int sse_events(const char *buf, char out[][2048], int max)
{
    int n = 0;
    const char *p = buf;
    while (*p && n < max) {
        const char *end = strstr(p, "\n\n");
        ck_assert_msg(end != NULL, "event without blank line: %s", p);
        snprintf(out[n++], 2048, "%.*s", (int)(end - p), p);
        p = end + 2;
    }
    return n;
}

START_TEST(sse_framing)
{
    srv_genreq *r = parse_ok("{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                             "\"prompt_token_ids\":[1],\"stream\":true,\"stream_options\":{\"include_usage\":true}}", 1);
    srv_buf b = { 0 };
    int32_t t = 5;
    srv_usage u = { 1, 2, 0 };
    ck_assert_int_eq(srv_sse_chunk(&b, r, "c1", 9, 0, "5", 1, &t, 1, NULL, 0, NULL, 1), 0);
    ck_assert_int_eq(srv_sse_chunk(&b, r, "c1", 9, 0, " 6", 2, &t, 1, NULL, 0, NULL, 0), 0);
    ck_assert_int_eq(srv_sse_chunk(&b, r, "c1", 9, 0, "", 0, NULL, 0, NULL, 0, "stop", 0), 0);
    ck_assert_int_eq(srv_sse_usage(&b, r, "c1", 9, &u), 0);
    ck_assert_int_eq(srv_sse_done(&b), 0);
    char ev[8][2048];
    int n = sse_events(b.data, ev, 8);
    ck_assert_int_eq(n, 5);
    for (int i = 0; i < 4; i++) ck_assert_msg(strncmp(ev[i], "data: {", 7) == 0, "%s", ev[i]);
    ck_assert_str_eq(ev[4], "data: [DONE]");
    json_t *o = load(ev[0] + 6);
    ck_assert_str_eq(json_string_value(json_object_get(o, "object")), "chat.completion.chunk");
    json_t *d = json_object_get(json_array_get(json_object_get(o, "choices"), 0), "delta");
    ck_assert_str_eq(json_string_value(json_object_get(d, "role")), "assistant");
    ck_assert_str_eq(json_string_value(json_object_get(d, "content")), "5");
    ck_assert(json_is_null(json_object_get(o, "usage")));
    json_decref(o);
    o = load(ev[1] + 6);
    d = json_object_get(json_array_get(json_object_get(o, "choices"), 0), "delta");
    ck_assert_ptr_null(json_object_get(d, "role"));
    ck_assert_str_eq(json_string_value(json_object_get(d, "content")), " 6");
    json_decref(o);
    o = load(ev[2] + 6);
    json_t *c = json_array_get(json_object_get(o, "choices"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(c, "finish_reason")), "stop");
    ck_assert_int_eq(json_object_size(json_object_get(c, "delta")), 0);
    json_decref(o);
    o = load(ev[3] + 6);
    ck_assert_int_eq(json_array_size(json_object_get(o, "choices")), 0);
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(o, "usage"), "completion_tokens")), 2);
    json_decref(o);

    srv_buf_reset(&b);
    srv_error e;
    srv_error_set(&e, 500, "server_error", NULL, NULL, "boom\nline");
    ck_assert_int_eq(srv_sse_error(&b, &e), 0);
    n = sse_events(b.data, ev, 8);
    ck_assert_int_eq(n, 1);
    ck_assert(strncmp(ev[0], "event: error\ndata: {\"error\":", 28) == 0);
    ck_assert_ptr_null(strchr(ev[0] + 13, '\n')); /* the newline is escaped inside JSON */
    srv_buf_free(&b);
    srv_genreq_free(r);
}
END_TEST

/* An event that cannot be appended leaves no part of itself behind. */
START_TEST(sse_no_partial_event)
{
    srv_genreq *r = parse_ok("{\"model\":\"tiny\",\"prompt\":[1],\"stream\":true}", 0);
    srv_buf b = { 0 };
    srv_error e;
    srv_error_set(&e, 500, "server_error", NULL, NULL, "x");
    for (int k = 0; k < 2; k++) {
        fail_alloc(0, 0);
        int rc = k == 0 ? srv_sse_chunk(&b, r, "c1", 9, 0, "abc", 3, NULL, 0, NULL, 0, NULL, 1)
                        : srv_sse_error(&b, &e);
        fail_alloc_off();
        ck_assert_int_eq(rc, -1);
        ck_assert_uint_eq(b.len, 0);
        ck_assert(b.failed);
        srv_buf_reset(&b);
    }
    ck_assert_int_eq(srv_sse_chunk(&b, r, "c1", 9, 0, "abc", 3, NULL, 0, NULL, 0, NULL, 1), 0);
    ck_assert(strncmp(b.data, "data: {", 7) == 0 && !b.failed);
    srv_buf_free(&b);
    srv_genreq_free(r);
}
END_TEST

START_TEST(stop_scan)
{
    char *stops[] = { "END", "xy" };
    size_t lens[] = { 3, 2 };
    int st;
    /* no stop strings: everything goes */
    ck_assert_uint_eq(srv_stop_scan("abc", 3, 0, stops, lens, 0, &st), 3);
    ck_assert(!st);
    /* a tail that may start a stop string is held back */
    ck_assert_uint_eq(srv_stop_scan("abcEN", 5, 0, stops, lens, 2, &st), 3);
    ck_assert(!st);
    ck_assert_uint_eq(srv_stop_scan("abcx", 4, 0, stops, lens, 2, &st), 3);
    /* then released when it turns out not to be one */
    ck_assert_uint_eq(srv_stop_scan("abcENq", 6, 3, stops, lens, 2, &st), 6);
    ck_assert(!st);
    /* a match ends the text where the stop string begins */
    ck_assert_uint_eq(srv_stop_scan("abcEND tail", 11, 3, stops, lens, 2, &st), 3);
    ck_assert(st);
    ck_assert_uint_eq(srv_stop_scan("1 xy 2", 6, 0, stops, lens, 2, &st), 2);
    ck_assert(st);
    /* the earliest match wins */
    ck_assert_uint_eq(srv_stop_scan("xyEND", 5, 0, stops, lens, 2, &st), 0);
    ck_assert(st);
    /* never splits a UTF-8 sequence */
    ck_assert_uint_eq(srv_stop_scan("a\xc3", 2, 0, stops, lens, 0, &st), 1);
    ck_assert_uint_eq(srv_stop_scan("a\xc3\xa9", 3, 0, stops, lens, 0, &st), 3);
}
END_TEST

START_TEST(token_text)
{
    char b[SRV_PIECE_MAX];
    ck_assert_uint_eq(srv_token_piece(NULL, 42, 1, b), 2);
    ck_assert_str_eq(b, "42");
    ck_assert_uint_eq(srv_token_piece(NULL, 7, 0, b), 2);
    ck_assert_str_eq(b, " 7");
}
END_TEST

/* A fake byte-level tokenizer: byte b is token b + 3; the chat template is
 * "role: content\n" per message, then "assistant: ". */
static int fake_encode(void *ctx, const char *text, size_t len, int add_special, int32_t **ids, int *n,
                       char *err, size_t errlen)
{
    (void)ctx;
    (void)add_special; /* no post-processor */
    if (len >= 5 && memcmp(text, "BOOM!", 5) == 0) {
        snprintf(err, errlen, "fake failure");
        return -1;
    }
    *ids = malloc((len ? len : 1) * sizeof **ids);
    for (size_t i = 0; i < len; i++) (*ids)[i] = (unsigned char)text[i] + 3;
    *n = (int)len;
    return 0;
}

/* The last chat request the fake saw (a reference). */
static json_t *fake_last_req;

static int fake_chat(void *ctx, json_t *req, int32_t **ids, int *n, char *err, size_t errlen)
{
    json_decref(fake_last_req);
    fake_last_req = json_incref(req);
    json_t *msgs = json_object_get(req, "messages");
    const char *first = json_string_value(json_object_get(json_array_get(msgs, 0), "content"));
    if (first && !strcmp(first, "RAISE")) { /* a template's raise_exception */
        snprintf(err, errlen, "the chat template refused the messages: roles must alternate");
        return ENG_EINVAL;
    }
    if (first && !strcmp(first, "NOTEMPLATE")) {
        snprintf(err, errlen, "the model directory x has no chat template");
        return ENG_EUNSUPPORTED;
    }
    srv_buf b = { 0 };
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        json_t *m = json_array_get(msgs, i);
        json_t *c = json_object_get(m, "content");
        srv_buf_printf(&b, "%s: %s\n", json_string_value(json_object_get(m, "role")),
                       json_is_string(c) ? json_string_value(c) : "");
    }
    json_t *agp = json_object_get(req, "add_generation_prompt"); /* default true */
    if (!agp || json_is_true(agp)) srv_buf_puts(&b, "assistant: ");
    int rc = fake_encode(ctx, b.data, b.len, 1, ids, n, err, errlen);
    srv_buf_free(&b);
    return rc;
}

static int fake_bytes(void *ctx, int32_t tok, char *buf, size_t cap)
{
    (void)ctx;
    if (tok >= 3 && tok < 259) {
        buf[0] = (char)(tok - 3);
        return 1;
    }
    return snprintf(buf, cap, "<%d>", (int)tok);
}

static int fake_decode(void *ctx, const int32_t *ids, int n, char **text, size_t *len, char *err,
                       size_t errlen)
{
    srv_buf b = { 0 };
    for (int i = 0; i < n; i++) {
        char p[SRV_PIECE_MAX];
        srv_buf_append(&b, p, (size_t)fake_bytes(ctx, ids[i], p, sizeof p));
    }
    srv_buf_append(&b, "", 0);
    *text = b.data;
    *len = b.len;
    return 0;
}

static const srv_codec FAKE = { NULL, fake_encode, fake_chat, fake_decode, fake_bytes, NULL };

START_TEST(parse_with_tokenizer)
{
    srv_model_desc md = { "tiny", 4096, 128, &FAKE, 16 };
    srv_genreq *r = NULL;
    srv_error e;
    const char *b = "{\"model\":\"tiny\",\"prompt\":\"AB\"}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 0, &md, NULL, &r, &e), 0);
    ck_assert_int_eq(r->n_prompt, 2);
    ck_assert_int_eq(r->prompt[0], 'A' + 3);
    ck_assert(!r->return_token_ids); /* text is real now */
    srv_genreq_free(r);
    b = "{\"model\":\"tiny\",\"prompt\":[\"AB\"]}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 0, &md, NULL, &r, &e), 0);
    ck_assert_int_eq(r->n_prompt, 2);
    srv_genreq_free(r);
    b = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 1, &md, NULL, &r, &e), 0);
    ck_assert_int_eq(r->n_prompt, (int)strlen("user: hi\nassistant: "));
    ck_assert_int_eq(r->max_tokens, 128 - r->n_prompt);
    srv_genreq_free(r);
    /* the chat request the codec gets: messages plus the template's fields */
    b = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"}]},"
        "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\",\"type\":\"function\","
        "\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]},{\"role\":\"tool\",\"tool_call_id\":\"c1\","
        "\"content\":\"4\"}],\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],"
        "\"chat_template_kwargs\":{\"enable_thinking\":false},\"documents\":[{\"title\":\"t\",\"text\":\"x\"}]}";
    ck_assert_msg(srv_genreq_parse(b, strlen(b), 1, &md, NULL, &r, &e) == 0, "%s", e.message);
    ck_assert(json_is_array(json_object_get(fake_last_req, "tools")));
    ck_assert(json_is_false(json_object_get(json_object_get(fake_last_req, "chat_template_kwargs"), "enable_thinking")));
    ck_assert(json_is_array(json_object_get(fake_last_req, "documents")));
    ck_assert(json_is_true(json_object_get(fake_last_req, "add_generation_prompt")));
    srv_genreq_free(r);
    b = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"assistant\",\"content\":\"Once\"}],"
        "\"continue_final_message\":true}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 1, &md, NULL, &r, &e), 0);
    ck_assert(json_is_false(json_object_get(fake_last_req, "add_generation_prompt")));
    ck_assert(json_is_true(json_object_get(fake_last_req, "continue_final_message")));
    srv_genreq_free(r);
    /* a template's refusal is the request's 400, with its message */
    b = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"RAISE\"}]}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 1, &md, NULL, &r, &e), -1);
    ck_assert_int_eq(e.status, 400);
    ck_assert_str_eq(e.code, "chat_template_error");
    ck_assert_ptr_nonnull(strstr(e.message, "roles must alternate"));
    b = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"NOTEMPLATE\"}]}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 1, &md, NULL, &r, &e), -1);
    ck_assert_int_eq(e.status, 400);
    ck_assert_str_eq(e.code, "chat_template_unavailable");
    ck_assert_ptr_nonnull(strstr(e.message, "no chat template"));
    json_decref(fake_last_req);
    fake_last_req = NULL;
    /* \u0000 is text: it reaches the tokenizer, and a stop string may hold it */
    b = "{\"model\":\"tiny\",\"prompt\":\"A\\u0000B\",\"stop\":[\"\\u0000\",\"x\\u0000y\"]}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 0, &md, NULL, &r, &e), 0);
    ck_assert_int_eq(r->n_prompt, 3);
    ck_assert_int_eq(r->prompt[1], 0 + 3);
    ck_assert_int_eq(r->n_stop, 2);
    ck_assert(r->stop_len[0] == 1 && r->stop[0][0] == '\0' && r->stop_len[1] == 3);
    int st;
    ck_assert_uint_eq(srv_stop_scan("ab\0cd", 5, 0, r->stop, r->stop_len, 2, &st), 2);
    ck_assert(st);
    srv_genreq_free(r);
    b = "{\"model\":\"tiny\\u0000\",\"prompt\":\"A\"}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 0, &md, NULL, &r, &e), -1);
    ck_assert_int_eq(e.status, 404);
    b = "{\"model\":\"tiny\",\"prompt\":\"BOOM!\"}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 0, &md, NULL, &r, &e), -1);
    ck_assert_str_eq(e.param, "prompt");
    ck_assert_ptr_nonnull(strstr(e.message, "fake failure"));
    b = "{\"model\":\"tiny\",\"prompt\":\"\"}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 0, &md, NULL, &r, &e), -1);
    /* a long text prompt is measured in tokens */
    char big[400] = "{\"model\":\"tiny\",\"max_tokens\":10,\"prompt\":\"";
    for (int i = 0; i < 120; i++) strcat(big, "x");
    strcat(big, "\"}");
    ck_assert_int_eq(srv_genreq_parse(big, strlen(big), 0, &md, NULL, &r, &e), -1);
    ck_assert_str_eq(e.code, "context_length_exceeded");
    /* pieces and logprobs use the tokenizer's bytes */
    char p[SRV_PIECE_MAX];
    ck_assert_uint_eq(srv_token_piece(&FAKE, 'z' + 3, 0, p), 1);
    ck_assert_int_eq(p[0], 'z');
    b = "{\"model\":\"tiny\",\"prompt\":\"A\",\"logprobs\":1}";
    ck_assert_int_eq(srv_genreq_parse(b, strlen(b), 0, &md, NULL, &r, &e), 0);
    srv_logprob lp = { .token = 'q' + 3, .logprob = -1, .n_top = 1, .top_tokens = { 'q' + 3 },
                       .top_logprobs = { -1 } };
    srv_usage u = { 1, 1, 0 };
    char *s = srv_build_completion(r, "c", 1, &(srv_choice_out){ "q", 1, NULL, 0, &lp, 1, "length" }, 1, NULL, 0, &u);
    json_t *o = json_loads(s, 0, NULL);
    json_t *l = json_object_get(json_array_get(json_object_get(o, "choices"), 0), "logprobs");
    ck_assert_str_eq(json_string_value(json_array_get(json_object_get(l, "tokens"), 0)), "q");
    ck_assert_ptr_nonnull(json_object_get(json_array_get(json_object_get(l, "top_logprobs"), 0), "q"));
    ck_assert_ptr_null(json_object_get(json_array_get(json_object_get(o, "choices"), 0), "token_ids"));
    json_decref(o);
    free(s);
    srv_genreq_free(r);
}
END_TEST

/* Authentication fails closed: whichever allocation fails while the key
 * table is built, the build fails, or the table it gives admits exactly
 * the configured keys. */
START_TEST(auth_fails_closed)
{
    srv_config c;
    memset(&c, 0, sizeof c);
    c.api_keys = "k1,k2";
    srv_identity who;
    int failures = 0;
    for (int k = 0; k < 50; k++) {
        srv_auth *a = NULL;
        fail_alloc(k, 0);
        int rc = srv_auth_load(&c, &a);
        int failed = atomic_load(&FI.failed);
        fail_alloc_off();
        if (rc != 0) {
            ck_assert_ptr_null(a);
            failures++;
            continue;
        }
        ck_assert_int_eq(srv_auth_count(a), 2);
        ck_assert(srv_auth_check(a, "Bearer k2", 0, &who));
        ck_assert(!srv_auth_check(a, NULL, 0, &who));
        ck_assert(!srv_auth_check(a, "Bearer k3", 0, &who));
        srv_auth_free(a);
        if (!failed) break; /* every allocation of the build was tried */
    }
    ck_assert_int_gt(failures, 0);
    /* a NULL table (never built) admits nobody */
    ck_assert(!srv_auth_check(NULL, "Bearer k1", 0, &who));
    /* api_keys that name no key do not turn authentication off */
    c.api_keys = " , ,";
    srv_auth *a = NULL;
    ck_assert_int_eq(srv_auth_load(&c, &a), -1);
    /* no key configured at all: open, as documented */
    c.api_keys = "";
    ck_assert_int_eq(srv_auth_load(&c, &a), 0);
    ck_assert(srv_auth_check(a, NULL, 0, &who));
    ck_assert_str_eq(who.user, "local");
    ck_assert(!who.admin); /* not on loopback */
    srv_auth_free(a);
}
END_TEST

START_TEST(tokenize_shapes)
{
    srv_model_desc md = { "tiny", 4096, 128, &FAKE, 16 };
    srv_error e;
    const char *b = "{\"prompt\":\"AB\"}";
    char *out = srv_tokenize(b, strlen(b), &md, &e);
    ck_assert_ptr_nonnull(out);
    json_t *o = load(out);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "count")), 2);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "max_model_len")), 128);
    ck_assert_int_eq(json_integer_value(json_array_get(json_object_get(o, "tokens"), 1)), 'B' + 3);
    ck_assert(json_is_null(json_object_get(o, "token_strs")));
    json_decref(o);
    free(out);
    /* messages: the chat template, with or without the generation prompt */
    b = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
        "\"add_generation_prompt\":false}";
    out = srv_tokenize(b, strlen(b), &md, &e);
    ck_assert_ptr_nonnull(out);
    o = load(out);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "count")), (int)strlen("user: hi\n"));
    json_decref(o);
    free(out);
    /* the chat template's fields reach the codec as on the chat route */
    b = "{\"messages\":[{\"role\":\"assistant\",\"content\":\"Once\"}],\"continue_final_message\":true,"
        "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],"
        "\"chat_template_kwargs\":{\"enable_thinking\":false}}";
    out = srv_tokenize(b, strlen(b), &md, &e);
    ck_assert_msg(out != NULL, "%s", e.message);
    free(out);
    ck_assert(json_is_array(json_object_get(fake_last_req, "tools")));
    ck_assert(json_is_false(json_object_get(json_object_get(fake_last_req, "chat_template_kwargs"), "enable_thinking")));
    ck_assert(json_is_true(json_object_get(fake_last_req, "continue_final_message")));
    ck_assert(json_is_false(json_object_get(fake_last_req, "add_generation_prompt")));
    /* a role with a NUL in it is no role */
    b = "{\"messages\":[{\"role\":\"user\\u0000x\",\"content\":\"x\"}]}";
    ck_assert_ptr_null(srv_tokenize(b, strlen(b), &md, &e));
    ck_assert_str_eq(e.param, "messages[0]");
    /* the template's errors are the chat route's */
    b = "{\"messages\":[{\"role\":\"user\",\"content\":\"RAISE\"}]}";
    ck_assert_ptr_null(srv_tokenize(b, strlen(b), &md, &e));
    ck_assert_int_eq(e.status, 400);
    ck_assert_str_eq(e.code, "chat_template_error");
    ck_assert_str_eq(e.param, "messages");
    b = "{\"messages\":[{\"role\":\"user\",\"content\":\"NOTEMPLATE\"}]}";
    ck_assert_ptr_null(srv_tokenize(b, strlen(b), &md, &e));
    ck_assert_str_eq(e.code, "chat_template_unavailable");
    b = "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"chat_template\":\"{{ 1 }}\"}";
    ck_assert_ptr_null(srv_tokenize(b, strlen(b), &md, &e));
    ck_assert_str_eq(e.param, "chat_template");
    json_decref(fake_last_req);
    fake_last_req = NULL;
    b = "{\"tokens\":[75,108,108]}"; /* "Hii" */
    out = srv_detokenize(b, strlen(b), &md, &e);
    ck_assert_str_eq(out, "{\"prompt\":\"Hii\"}");
    free(out);
    b = "{\"model\":\"other\",\"tokens\":[]}";
    ck_assert_ptr_null(srv_detokenize(b, strlen(b), &md, &e));
    ck_assert_int_eq(e.status, 404);
    b = "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"add_special_tokens\":true}";
    ck_assert_ptr_null(srv_tokenize(b, strlen(b), &md, &e));
    ck_assert_str_eq(e.param, "add_special_tokens");
    /* no tokenizer */
    b = "{\"prompt\":\"AB\"}";
    ck_assert_ptr_null(srv_tokenize(b, strlen(b), &MD, &e));
    ck_assert_str_eq(e.code, "no_tokenizer");
}
END_TEST

START_TEST(plan_decoders_and_chunks)
{
    /* 3 decoders, 2 prefills (one huge) under a budget of 64, chunk 32. */
    srv_plan_seq s[5] = {
        { 0, 1, 0, 0 }, { 1000, 2, 0, 0 }, { 0, 3, 0, 0 }, { 10, 4, 0, 0 }, { 0, 5, 0, 0 },
    };
    srv_plan_item it[5];
    int n = srv_plan_step(s, 5, 64, 32, 0, NULL, it);
    int tok = 0, dec = 0;
    int got[5] = { 0 };
    for (int i = 0; i < n; i++) {
        tok += it[i].n_tokens;
        got[it[i].idx] = it[i].n_tokens;
        dec += s[it[i].idx].prefill_left == 0;
    }
    ck_assert_int_eq(dec, 3);              /* every decoder runs */
    ck_assert_int_eq(got[0], 1);
    ck_assert_int_eq(got[2], 1);
    ck_assert_int_eq(got[4], 1);
    ck_assert_int_eq(got[1], 32);          /* the huge prompt gets one chunk */
    ck_assert_int_eq(got[3], 10);          /* the later prompt still fits */
    ck_assert_int_le(tok, 64);
    /* budget exhausted by the oldest prefill: the younger waits, decoders still run */
    n = srv_plan_step(s, 5, 20, 32, 0, NULL, it);
    memset(got, 0, sizeof got);
    for (int i = 0; i < n; i++) got[it[i].idx] = it[i].n_tokens;
    ck_assert_int_eq(got[0] + got[2] + got[4], 3);
    ck_assert_int_eq(got[1], 17);
    ck_assert_int_eq(got[3], 0);
    /* a sequence's own chunk cap (echo with logprobs prefills one token a step) */
    s[1].chunk = 1;
    n = srv_plan_step(s, 5, 64, 32, 0, NULL, it);
    memset(got, 0, sizeof got);
    for (int i = 0; i < n; i++) got[it[i].idx] = it[i].n_tokens;
    ck_assert_int_eq(got[1], 1);
    ck_assert_int_eq(got[3], 10);
}
END_TEST

START_TEST(plan_fifo_prefill)
{
    /* Arrival order, not array order, decides who prefills first. */
    srv_plan_seq s[3] = { { 100, 9, 0, 0 }, { 100, 3, 0, 0 }, { 100, 5, 0, 0 } };
    srv_plan_item it[3];
    int n = srv_plan_step(s, 3, 150, 100, 0, NULL, it);
    ck_assert_int_eq(n, 2);
    ck_assert_int_eq(it[0].idx, 1);
    ck_assert_int_eq(it[0].n_tokens, 100);
    ck_assert_int_eq(it[1].idx, 2);
    ck_assert_int_eq(it[1].n_tokens, 50);
}
END_TEST

START_TEST(plan_more_decoders_than_budget)
{
    /* 6 decoders, budget 4: the ones that ran longest ago go first; over
     * two steps everyone runs. */
    srv_plan_seq s[6];
    for (int i = 0; i < 6; i++) s[i] = (srv_plan_seq){ 0, (uint64_t)i, 0, 0 };
    srv_plan_item it[6];
    int ran[6] = { 0 };
    for (int step = 1; step <= 2; step++) {
        int n = srv_plan_step(s, 6, 4, 8, 0, NULL, it);
        ck_assert_int_eq(n, 4);
        for (int i = 0; i < n; i++) {
            ck_assert_int_eq(it[i].n_tokens, 1);
            ran[it[i].idx]++;
            s[it[i].idx].last_step = step;
        }
    }
    for (int i = 0; i < 6; i++) ck_assert_int_ge(ran[i], 1);
    ck_assert_int_eq(srv_plan_step(s, 0, 4, 8, 0, NULL, it), 0);
    ck_assert_int_eq(srv_plan_step(s, 6, 0, 8, 0, NULL, it), 0);
}
END_TEST

/* plan.c's cost model from fake step times (a fake clock): 8 decoders take
 * 0.15 s a step, every prompt token 0.02 s more. */
static srv_step_cost fake_cost(void)
{
    srv_step_cost c = { 0 };
    for (int i = 0; i < 5; i++) srv_cost_note(&c, 8, 0, 0.15);
    for (int i = 0; i < 5; i++) srv_cost_note(&c, 8, 16 + 48 * (i & 1), 0.15 + 0.02 * (16 + 48 * (i & 1)));
    return c;
}

START_TEST(plan_cost_model)
{
    srv_step_cost c = { 0 };
    /* nothing measured: no time limit */
    ck_assert_int_eq(srv_plan_prefill_time(0.25, &c, 8), -1);
    srv_cost_note(&c, 8, 0, 0.15);
    ck_assert_int_eq(srv_plan_prefill_time(0.25, &c, 8), -1); /* prompt cost still unknown */
    c = fake_cost();
    ck_assert_double_eq_tol(srv_cost_decode(&c, 8), 0.15, 1e-9);
    ck_assert_double_eq_tol(srv_cost_tok(&c), 0.02, 1e-9);
    /* more decoders cost one token's marginal time each; fewer never less
     * than their share */
    ck_assert_double_eq_tol(srv_cost_decode(&c, 10), 0.19, 1e-9);
    ck_assert_double_eq_tol(srv_cost_decode(&c, 4), 0.075, 1e-9);
    ck_assert(srv_cost_decode(&c, 0) == 0);
    /* decode steps seen with one decoder only: eight cost the fixed part
     * once and seven tokens more, not eight times a one-decoder step */
    srv_step_cost one = { 0 };
    srv_cost_note(&one, 0, 128, 128 * 5e-3 + 0.03);
    srv_cost_note(&one, 1, 0, 0.035);
    srv_cost_note(&one, 1, 8, 0.035 + 8 * 5e-3);
    ck_assert_double_eq_tol(srv_cost_decode(&one, 8), 0.035 + 7 * srv_cost_tok(&one), 1e-9);
    ck_assert(srv_cost_decode(&one, 8) < 0.1);
    /* it follows a change (a slower prompt position) within a few steps */
    for (int i = 0; i < 20; i++) srv_cost_note(&c, 8, 32, 0.15 + 0.04 * 32);
    ck_assert_double_eq_tol(srv_cost_tok(&c), 0.04, 0.001);
    /* a prompt token is never taken for free, whatever the noise */
    srv_step_cost z = { 0 };
    srv_cost_note(&z, 8, 0, 0.30);
    srv_cost_note(&z, 8, 8, 0.20); /* faster than the decodes alone */
    ck_assert(srv_cost_tok(&z) > 0);
    /* nonsense is ignored */
    srv_cost_note(&z, 0, 0, 1.0);
    srv_cost_note(&z, 8, 0, -1.0);
    ck_assert_int_eq(z.n_dec_obs, 1);
    ck_assert_int_eq(z.n_pre_obs, 1);
}
END_TEST

/* predicted seconds of a planned step under the fake cost model */
static double plan_secs(const srv_step_cost *c, const srv_plan_seq *s, const srv_plan_item *it, int n)
{
    int dec = 0, pre = 0;
    for (int i = 0; i < n; i++) {
        if (s[it[i].idx].prefill_left == 0) dec++;
        else pre += it[i].n_tokens;
    }
    return srv_cost_decode(c, dec) + srv_cost_tok(c) * pre;
}

/* 8 decoding streams (s[0..7]), then a 512-token prompt (s[8]) */
static void streams_and_prompt(srv_plan_seq s[9])
{
    for (int i = 0; i < 8; i++) s[i] = (srv_plan_seq){ 0, (uint64_t)i, 0, 0 };
    s[8] = (srv_plan_seq){ 512, 8, 0, 0 };
}

START_TEST(plan_time_budget)
{
    /* 8 streams decode when a 512-token prompt arrives */
    srv_step_cost c = fake_cost();
    srv_plan_seq s[9];
    streams_and_prompt(s);
    srv_plan_item it[9];
    /* tokens only: one 256-token chunk, a step of 5 s (34 decode steps) */
    int n = srv_plan_step(s, 9, 512, 256, 0, &c, it);
    ck_assert_int_eq(n, 9);
    ck_assert(plan_secs(&c, s, it, n) > 5.0);
    /* a 0.25 s target: decoders (0.15 s) first, then what fits the rest of
     * twice their time (0.30 s): 7 prompt tokens */
    n = srv_plan_step(s, 9, 512, 256, 0.25, &c, it);
    ck_assert_int_eq(n, 9);
    for (int i = 0; i < 8; i++) {
        ck_assert_int_eq(it[i].idx, i);
        ck_assert_int_eq(it[i].n_tokens, 1);
    }
    ck_assert_int_eq(it[8].idx, 8);
    ck_assert_int_eq(it[8].n_tokens, 7);
    ck_assert(plan_secs(&c, s, it, n) <= 0.30 + 1e-9);
    /* a 1 s target: (1 - 0.15) / 0.02 = 42 tokens, the step stays under it */
    n = srv_plan_step(s, 9, 512, 256, 1.0, &c, it);
    ck_assert_int_eq(it[8].n_tokens, 42);
    ck_assert(plan_secs(&c, s, it, n) <= 1.0);
    /* the token budget and the chunk still cap */
    n = srv_plan_step(s, 9, 20, 256, 1.0, &c, it);
    ck_assert_int_eq(it[8].n_tokens, 12);
    n = srv_plan_step(s, 9, 512, 30, 1.0, &c, it);
    ck_assert_int_eq(it[8].n_tokens, 30);
    /* no decoder to protect: the prompt takes its whole chunk */
    n = srv_plan_step(&s[8], 1, 512, 256, 0.25, &c, it);
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(it[0].n_tokens, 256);
    /* two prompts: the older one takes the time budget first */
    s[7] = (srv_plan_seq){ 100, 9, 0, 0 };
    n = srv_plan_step(s, 9, 512, 256, 1.0, &c, it);
    ck_assert_int_eq(n, 8);
    ck_assert_int_eq(it[7].idx, 8);
    ck_assert_int_eq(it[7].n_tokens, (int)((1.0 - srv_cost_decode(&c, 7)) / 0.02));
}
END_TEST

START_TEST(plan_time_budget_progress)
{
    /* Steps go on until the prompt is in: every decoder runs in every step,
     * the prompt moves in every step, no step is predicted over 0.30 s. */
    srv_step_cost c = fake_cost();
    srv_plan_seq s[9];
    streams_and_prompt(s);
    srv_plan_item it[9];
    int steps = 0;
    while (s[8].prefill_left > 0) {
        int n = srv_plan_step(s, 9, 512, 256, 0.25, &c, it), dec = 0, moved = 0;
        ck_assert(plan_secs(&c, s, it, n) <= 0.30 + 1e-9);
        for (int i = 0; i < n; i++) {
            if (it[i].idx < 8) dec++;
            else moved = it[i].n_tokens;
        }
        ck_assert_int_eq(dec, 8);
        ck_assert_int_ge(moved, 1);
        s[8].prefill_left -= moved;
        ck_assert_int_lt(++steps, 100);
    }
    ck_assert_int_eq(steps, (512 + 6) / 7);
    /* prompt tokens far dearer than the target allows: still one a step;
     * decoders slower than the target: the step may take twice theirs */
    srv_step_cost dear = { 0 };
    srv_cost_note(&dear, 8, 0, 0.1);
    srv_cost_note(&dear, 8, 1, 10.1);
    ck_assert_int_eq(srv_plan_prefill_time(0.25, &dear, 8), 1);
    ck_assert_int_eq(srv_plan_prefill_time(0.01, &c, 8), 7);
    s[8].prefill_left = 512;
    int n = srv_plan_step(s, 9, 512, 256, 0.25, &dear, it);
    ck_assert_int_eq(n, 9);
    ck_assert_int_eq(it[8].n_tokens, 1);
}
END_TEST

/* resume.c: the cost model of load / recompute / both. */
START_TEST(resume_cost_model)
{
    srv_resume_rates r = { 0 };
    unsigned char warm[8] = { 0 };
    srv_resume_in in = { .policy = SRV_RESUME_AUTO, .n_blocks = 8, .block_tokens = 32, .block_bytes = 1 << 20,
                         .warm = warm, .rates = &r };
    srv_resume_plan pl;
    /* nothing measured yet: load (it measures the bandwidth) */
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_LOAD);
    ck_assert_int_eq(pl.split, 0);
    /* forced policies */
    in.policy = SRV_RESUME_RECOMPUTE;
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_RECOMPUTE);
    ck_assert_int_eq(pl.split, 8);
    in.policy = SRV_RESUME_LOAD;
    r.disk_bps = 1e3; /* hopelessly slow disk: load anyway when told to */
    for (int b = 0; b < SRV_RATE_BUCKETS; b++) r.prefill_tps[b] = 1e6;
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_LOAD);
    in.policy = SRV_RESUME_BOTH; /* unknown rates: split in the middle */
    r = (srv_resume_rates){ 0 };
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_BOTH);
    ck_assert_int_eq(pl.split, 4);
    in.policy = SRV_RESUME_AUTO;
    /* GPU-like: host memory far faster than prefill -> load all */
    r.warm_bps = 55e9;
    r.disk_bps = 1.1e9;
    for (int b = 0; b < SRV_RATE_BUCKETS; b++) r.prefill_tps[b] = 2e4;
    memset(warm, 1, sizeof warm);
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_LOAD);
    /* CPU-like with a slow disk: prefill far faster than reading -> recompute all */
    memset(warm, 0, sizeof warm);
    r.disk_bps = 1e6;       /* 1 MiB blocks: ~1 s each */
    for (int b = 0; b < SRV_RATE_BUCKETS; b++) r.prefill_tps[b] = 1e5; /* 32 tokens: 0.3 ms */
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_RECOMPUTE);
    ck_assert_int_eq(pl.split, 8);
    /* equal speeds: both at once, split in the middle, and the estimate is
     * half of either alone */
    r.disk_bps = (double)(1 << 20); /* 1 s per block */
    for (int b = 0; b < SRV_RATE_BUCKETS; b++) r.prefill_tps[b] = 32; /* 1 s per block */
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_BOTH);
    ck_assert_int_eq(pl.split, 4);
    ck_assert(fabs(pl.t_est - 4.0) < 1e-9);
    ck_assert(fabs(pl.t_load - 8.0) < 1e-9 && fabs(pl.t_prefill - 8.0) < 1e-9);
    /* prefill 3x faster than loading: recompute 3/4, load the last quarter */
    for (int b = 0; b < SRV_RATE_BUCKETS; b++) r.prefill_tps[b] = 96;
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_BOTH);
    ck_assert_int_eq(pl.split, 6);
    /* the last blocks are warm (fast): they are the ones loaded */
    for (int b = 0; b < SRV_RATE_BUCKETS; b++) r.prefill_tps[b] = 32;
    r.warm_bps = 1e12;
    warm[6] = warm[7] = 1;
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_BOTH);
    ck_assert_int_eq(pl.split, 3); /* prefill 3 s vs load blocks 3..5 (3 s) + 2 warm (~0) */
    /* loading nearly free: no split beats it */
    memset(warm, 0, sizeof warm);
    r.disk_bps = 1e12; /* loading nearly free */
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_LOAD);
    /* rates by position: a slow long-context bucket makes prefill of late positions cost more */
    srv_resume_rates q = { 0 };
    q.prefill_tps[0] = 1000;
    ck_assert(fabs(srv_resume_prefill_s(&q, 0, 512) - 0.512) < 1e-9); /* nearest bucket's rate */
    q.prefill_tps[1] = 256;
    ck_assert(fabs(srv_resume_prefill_s(&q, 0, 512) - (0.256 + 1.0)) < 1e-9);
    ck_assert(srv_resume_prefill_s(&(srv_resume_rates){ 0 }, 0, 10) < 0);
    ck_assert_int_eq(srv_rate_bucket(0), 0);
    ck_assert_int_eq(srv_rate_bucket(300), 1);
    ck_assert_int_eq(srv_rate_bucket(1 << 30), SRV_RATE_BUCKETS - 1);
    /* no blocks: nothing to do */
    in.n_blocks = 0;
    srv_resume_choose(&in, &pl);
    ck_assert_int_eq(pl.path, SRV_PATH_LOAD);
    ck_assert_int_eq(pl.split, 0);
    ck_assert_int_eq(srv_resume_policy_parse("both"), SRV_RESUME_BOTH);
    ck_assert_int_eq(srv_resume_policy_parse(""), SRV_RESUME_AUTO);
    ck_assert_int_eq(srv_resume_policy_parse("fast"), -1);
}
END_TEST

/* l3index.c: the retrieval index's bookkeeping (exactness against the scan:
 * tests/l3_index.sh). */
START_TEST(l3_index_sync)
{
    srv_l3index *ix = srv_l3index_new(2, 1 << 20);
    ck_assert_ptr_nonnull(ix);
    float e[2];
    ck_assert_int_eq(srv_l3index_put(ix, "u", 1, "s", 1, (float[]){ 1, 0 }), 0); /* not indexed: nothing */
    ck_assert_int_eq(srv_l3index_count(ix, "u"), -1);
    ck_assert_int_eq(srv_l3index_begin(ix, "u"), 0);
    for (int i = 0; i < 200; i++) { /* keys at angles i degrees: chunk i+1 */
        e[0] = (float)cos(i * M_PI / 180);
        e[1] = (float)sin(i * M_PI / 180);
        ck_assert_int_eq(srv_l3index_put(ix, "u", (uint64_t)i + 1, i < 100 ? "a" : "b", 1, e), 0);
    }
    ck_assert_int_eq(srv_l3index_count(ix, "u"), 200);
    uint64_t ids[4];
    double sc[4];
    float q[2] = { 1, 0 };
    ck_assert_int_eq(srv_l3index_top(ix, "u", NULL, q, 4, ids, sc), 4);
    ck_assert(ids[0] == 1 && ids[1] == 2 && ids[2] == 3 && ids[3] == 4);
    ck_assert(sc[0] >= sc[1] && sc[1] >= sc[2]);
    ck_assert_int_eq(srv_l3index_top(ix, "u", "a", q, 4, ids, sc), 4); /* session a's excluded */
    ck_assert(ids[0] == 101);
    srv_l3index_del(ix, "u", 1);
    srv_l3index_del(ix, "u", 3);
    srv_l3index_del(ix, "u", 999); /* unknown: nothing */
    ck_assert_int_eq(srv_l3index_count(ix, "u"), 198);
    ck_assert_int_eq(srv_l3index_top(ix, "u", NULL, q, 3, ids, sc), 3);
    ck_assert(ids[0] == 2 && ids[1] == 4 && ids[2] == 5);
    /* a replaced key moves; equal scores go to the smaller id */
    ck_assert_int_eq(srv_l3index_put(ix, "u", 150, "b", 1, (float[]){ 2, 0 }), 0);
    ck_assert_int_eq(srv_l3index_put(ix, "u", 7, "a", 1, (float[]){ 1, 0 }), 0);
    ck_assert_int_eq(srv_l3index_count(ix, "u"), 198);
    ck_assert_int_eq(srv_l3index_top(ix, "u", NULL, q, 3, ids, sc), 3);
    ck_assert(ids[0] == 7 && ids[1] == 150 && ids[2] == 2);
    ck_assert(sc[0] == sc[1]);
    ck_assert_int_eq(srv_l3index_top(ix, "nobody", NULL, q, 3, ids, sc), -1);
    srv_l3index_drop(ix, "u");
    ck_assert_int_eq(srv_l3index_count(ix, "u"), -1);
    srv_l3index_free(ix);
    /* over the budget, the least recently used user's index goes */
    ix = srv_l3index_new(64, 64 * 1024);
    float big[64] = { 1 };
    ck_assert_int_eq(srv_l3index_begin(ix, "old"), 0);
    ck_assert_int_eq(srv_l3index_put(ix, "old", 1, "s", 1, big), 0);
    ck_assert_int_eq(srv_l3index_begin(ix, "new"), 0);
    for (int i = 0; i < 400; i++) ck_assert_int_eq(srv_l3index_put(ix, "new", (uint64_t)i, "s", 1, big), 0);
    ck_assert_int_eq(srv_l3index_count(ix, "old"), -1);
    ck_assert_int_eq(srv_l3index_count(ix, "new"), 400); /* the user being filled stays */
    srv_l3index_free(ix);
}
END_TEST

START_TEST(reuse_prefix)
{
    int32_t have[70], p[80];
    for (int i = 0; i < 70; i++) have[i] = i;
    for (int i = 0; i < 80; i++) p[i] = i;
    /* the whole resident sequence is a prefix: keep all of it */
    ck_assert_int_eq(srv_reuse_len(have, 70, p, 80, 32), 70);
    /* divergence at 50: round down to a block boundary */
    p[50] = 999;
    ck_assert_int_eq(srv_reuse_len(have, 70, p, 80, 32), 32);
    /* the prompt is a prefix of what is resident: leave one token to run */
    for (int i = 0; i < 80; i++) p[i] = i;
    ck_assert_int_eq(srv_reuse_len(have, 70, p, 65, 32), 64);
    ck_assert_int_eq(srv_reuse_len(have, 70, p, 70, 32), 64);
    ck_assert_int_eq(srv_reuse_len(have, 70, p, 10, 32), 0);
    /* nothing in common */
    p[0] = 5;
    ck_assert_int_eq(srv_reuse_len(have, 70, p, 80, 32), 0);
    ck_assert_int_eq(srv_reuse_len(have, 0, p, 80, 32), 0);
}
END_TEST


/* ---- the engine thread with the bundled model (no HTTP) ------------------------ */

#include <pthread.h>
#include <unistd.h>

/* Events posted by the engine thread, collected under a lock. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    srv_event ev[8192];
    int n;
} EV = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, { { 0 } }, 0 };

static void collect(const srv_event *ev, int n, void *arg)
{
    (void)arg;
    pthread_mutex_lock(&EV.mu);
    for (int i = 0; i < n; i++) {
        if (EV.n < 8192) EV.ev[EV.n++] = ev[i];
        else free(ev[i].lp);
    }
    pthread_cond_broadcast(&EV.cv);
    pthread_mutex_unlock(&EV.mu);
}

/* Index of the first event of `type` for `job` at or after *from; waits up
 * to 20 s. */
static int wait_event(int type, srv_job *job)
{
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += 20;
    pthread_mutex_lock(&EV.mu);
    for (;;) {
        for (int i = 0; i < EV.n; i++)
            if (EV.ev[i].type == type && EV.ev[i].job == job) {
                pthread_mutex_unlock(&EV.mu);
                return i;
            }
        if (pthread_cond_timedwait(&EV.cv, &EV.mu, &dl) != 0) break;
    }
    pthread_mutex_unlock(&EV.mu);
    ck_abort_msg("timed out waiting for event %d", type);
    return -1;
}

static int count_tokens(srv_job *job, int32_t *ids, int cap)
{
    int n = 0;
    pthread_mutex_lock(&EV.mu);
    for (int i = 0; i < EV.n; i++)
        if (EV.ev[i].type == SRV_EV_TOKEN && EV.ev[i].job == job) {
            if (n < cap) ids[n] = EV.ev[i].token;
            n++;
        }
    pthread_mutex_unlock(&EV.mu);
    return n;
}

static const char *model_dir(void)
{
    static char path[4096];
    /* make check's serial harness exports srcdir (not AM_TESTS_ENVIRONMENT) */
    const char *top = getenv("top_srcdir");
    if (!top) top = getenv("srcdir");
    snprintf(path, sizeof path, "%s/models/mkad-tiny", top ? top : ".");
    return path;
}

static srv_config test_cfg(void)
{
    srv_config c;
    memset(&c, 0, sizeof c);
    c.model = (char *)model_dir();
    c.threads = 1;
    c.max_seqs = 4;
    c.max_batch_tokens = 64;
    c.prefill_chunk = 16;
    c.block_size = 8;
    c.kv_mem_mb = 64;
    c.max_sessions = 4;
    c.max_ctx = 256;
    return c;
}

static srv_engine *start_engine(const srv_config *c, srv_metrics *m)
{
    pthread_mutex_lock(&EV.mu);
    for (int i = 0; i < EV.n; i++) free(EV.ev[i].lp);
    EV.n = 0;
    pthread_mutex_unlock(&EV.mu);
    srv_engine *se = NULL;
    ck_assert_int_eq(srv_engine_start(c, m, collect, NULL, &se), 0);
    wait_event(SRV_EV_READY, NULL);
    return se;
}

/* What srv_job_start does besides submitting: the choices' loop state and
 * a stop flag per choice. */
static void job_choices(srv_job *j)
{
    atomic_init(&j->cancel, SRV_CANCEL_NONE);
    j->choice_stop = calloc((size_t)j->req->n, sizeof *j->choice_stop);
    j->ch = calloc((size_t)j->req->n, sizeof *j->ch);
    j->n_open = j->req->n;
    ck_assert_ptr_nonnull(j->choice_stop);
    ck_assert_ptr_nonnull(j->ch);
    for (int i = 0; i < j->req->n; i++) atomic_init(&j->choice_stop[i], 0);
}

static srv_job *new_job(const char *body)
{
    srv_model_desc md = { "mkad-tiny", 4096, 256, NULL, 16 };
    srv_job *j = calloc(1, sizeof *j);
    srv_error e;
    ck_assert_msg(srv_genreq_parse(body, strlen(body), 0, &md, NULL, &j->req, &e) == 0, "%s", e.message);
    job_choices(j);
    return j;
}

static void free_job(srv_job *j)
{
    srv_genreq_free(j->req);
    free(j->choice_stop);
    free(j->ch);
    free(j);
}

static long metric(srv_metrics *m, const char *name)
{
    srv_buf b = { 0 };
    srv_metrics_render(m, &b);
    char key[128];
    snprintf(key, sizeof key, "\n%s ", name);
    const char *p = strstr(b.data, key);
    long v = p ? strtol(p + strlen(key), NULL, 10) : -1;
    srv_buf_free(&b);
    return v;
}

START_TEST(engine_generate_and_sessions)
{
    srv_config c = test_cfg();
    c.max_seqs = 2;
    srv_metrics *m = srv_metrics_create();
    srv_engine *se = start_engine(&c, m);
    ck_assert_int_eq(srv_engine_get_info(se)->max_ctx, 256);

    /* plain generation: START, max_tokens TOKENs, FINAL length */
    const char *body = "{\"model\":\"mkad-tiny\",\"prompt\":[1,15,27,300,42,7,9,9,9,9],\"max_tokens\":6,"
                       "\"seed\":3,\"ignore_eos\":true,\"session_id\":\"a\"}";
    srv_job *a1 = new_job(body);
    srv_engine_submit(se, a1);
    int i = wait_event(SRV_EV_FINAL, a1);
    ck_assert_int_eq(EV.ev[i].finish, SRV_FINISH_LENGTH);
    ck_assert_int_eq(EV.ev[i].usage.completion_tokens, 6);
    ck_assert_int_eq(EV.ev[i].usage.cached_tokens, 0);
    int32_t ids[8];
    ck_assert_int_eq(count_tokens(a1, ids, 8), 6);

    /* same session, prompt extended by the completion: everything resident is reused */
    char body2[512];
    snprintf(body2, sizeof body2, "{\"model\":\"mkad-tiny\",\"prompt\":[1,15,27,300,42,7,9,9,9,9,%d,%d,%d,%d,%d,%d,5],"
             "\"max_tokens\":4,\"seed\":4,\"ignore_eos\":true,\"session_id\":\"a\"}",
             ids[0], ids[1], ids[2], ids[3], ids[4], ids[5]);
    srv_job *a2 = new_job(body2);
    srv_engine_submit(se, a2);
    i = wait_event(SRV_EV_FINAL, a2);
    ck_assert_int_eq(EV.ev[i].usage.cached_tokens, 15); /* 10 prompt + 5 fed completion tokens */
    int32_t with_cache[4], without[4];
    count_tokens(a2, with_cache, 4);

    /* the same prompt without a session gives the same tokens */
    char body3[512];
    snprintf(body3, sizeof body3, "%.*s}", (int)(strstr(body2, ",\"session_id\"") - body2), body2);
    srv_job *n1 = new_job(body3);
    srv_engine_submit(se, n1);
    i = wait_event(SRV_EV_FINAL, n1);
    ck_assert_int_eq(EV.ev[i].usage.cached_tokens, 0);
    count_tokens(n1, without, 4);
    ck_assert_mem_eq(with_cache, without, sizeof without);

    /* two slots: session b takes the second; session c evicts the LRU (a) */
    srv_job *b1 = new_job("{\"model\":\"mkad-tiny\",\"prompt\":[3,4,5],\"max_tokens\":2,\"session_id\":\"b\"}");
    srv_engine_submit(se, b1);
    wait_event(SRV_EV_FINAL, b1);
    ck_assert_int_eq(metric(m, "mkad_sessions_resident"), 2);
    srv_job *c1 = new_job("{\"model\":\"mkad-tiny\",\"prompt\":[3,4,6],\"max_tokens\":2,\"session_id\":\"c\"}");
    srv_engine_submit(se, c1);
    wait_event(SRV_EV_FINAL, c1);
    srv_job *a3 = new_job(body2);
    srv_engine_submit(se, a3);
    i = wait_event(SRV_EV_FINAL, a3);
    ck_assert_int_eq(EV.ev[i].usage.cached_tokens, 0); /* a was evicted */
    /* c stayed resident: its 3 prompt tokens and the first (fed) completion token */
    int32_t g[2];
    ck_assert_int_eq(count_tokens(c1, g, 2), 2);
    char bc2[256];
    snprintf(bc2, sizeof bc2, "{\"model\":\"mkad-tiny\",\"prompt\":[3,4,6,%d,7],\"max_tokens\":2,"
             "\"session_id\":\"c\"}", g[0]);
    srv_job *c2 = new_job(bc2);
    srv_engine_submit(se, c2);
    i = wait_event(SRV_EV_FINAL, c2);
    ck_assert_int_eq(EV.ev[i].usage.cached_tokens, 4);

    srv_engine_stop(se);
    srv_job *all[] = { a1, a2, n1, b1, c1, a3, c2 };
    for (size_t k = 0; k < sizeof all / sizeof *all; k++) free_job(all[k]);
    srv_metrics_free(m);
}
END_TEST

/* n > 1 at the engine thread: one START, the choices' TOKEN events tagged
 * with their index, CHOICE_END for all but the last, one FINAL with the
 * summed usage; choice 0 equals n = 1; a stop flag ends one choice early;
 * then a same-user prompt forks the finished request's full block; n above
 * the slots is a 400. */
START_TEST(engine_n_choices_and_prefix_sharing)
{
    srv_config c = test_cfg();
    c.prefix_sharing = 1;
    c.prefix_cache = 2;
    srv_metrics *m = srv_metrics_create();
    srv_engine *se = start_engine(&c, m);
    const char *b3 = "{\"model\":\"mkad-tiny\",\"prompt\":[1,15,27,300,42,7,9,9,9,9],\"max_tokens\":5,"
                     "\"seed\":9,\"ignore_eos\":true,\"n\":3}";
    srv_job *j3 = new_job(b3);
    srv_engine_submit(se, j3);
    int f = wait_event(SRV_EV_FINAL, j3);
    ck_assert_int_eq(EV.ev[f].finish, SRV_FINISH_LENGTH);
    ck_assert_int_eq(EV.ev[f].usage.completion_tokens, 15);
    ck_assert_int_eq(EV.ev[f].n_gen, 5);
    int32_t per[3][5];
    int n_per[3] = { 0 }, n_end = 0, n_start = 0;
    pthread_mutex_lock(&EV.mu);
    for (int i = 0; i < EV.n; i++) {
        if (EV.ev[i].job != j3) continue;
        if (EV.ev[i].type == SRV_EV_START) n_start++;
        if (EV.ev[i].type == SRV_EV_CHOICE_END) {
            n_end++;
            ck_assert_int_eq(EV.ev[i].n_gen, 5);
            ck_assert_int_ne(EV.ev[i].choice, EV.ev[f].choice);
        }
        if (EV.ev[i].type == SRV_EV_TOKEN) {
            int ch = EV.ev[i].choice;
            ck_assert(ch >= 0 && ch < 3 && n_per[ch] < 5);
            per[ch][n_per[ch]++] = EV.ev[i].token;
        }
    }
    pthread_mutex_unlock(&EV.mu);
    ck_assert_int_eq(n_start, 1);
    ck_assert_int_eq(n_end, 2);
    for (int ch = 0; ch < 3; ch++) ck_assert_int_eq(n_per[ch], 5);
    ck_assert(memcmp(per[0], per[1], sizeof per[0]) != 0 || memcmp(per[0], per[2], sizeof per[0]) != 0);
    /* n = 1, same seed: choice 0 */
    char b1[256];
    snprintf(b1, sizeof b1, "%.*s}", (int)(strstr(b3, ",\"n\":3") - b3), b3);
    srv_job *j1 = new_job(b1);
    srv_engine_submit(se, j1);
    wait_event(SRV_EV_FINAL, j1);
    int32_t one[5];
    ck_assert_int_eq(count_tokens(j1, one, 5), 5);
    ck_assert_mem_eq(one, per[0], sizeof one);
    /* a choice whose stop flag is set (the loop matched a stop string) ends
     * early; the others run to max_tokens */
    srv_job *js = new_job("{\"model\":\"mkad-tiny\",\"prompt\":[1,2,3],\"max_tokens\":200,\"ignore_eos\":true,"
                          "\"n\":2,\"seed\":1}");
    atomic_store(&js->choice_stop[1], 1);
    srv_engine_submit(se, js);
    f = wait_event(SRV_EV_FINAL, js);
    ck_assert_int_eq(EV.ev[f].choice, 0);
    ck_assert_int_eq(EV.ev[f].n_gen, 200);
    ck_assert_int_lt(EV.ev[f].usage.completion_tokens, 400);
    /* the n = 1 request's sequence stayed as a prefix-cache entry: its full
     * block (8 of its 15 tokens) is forked by a longer prompt of the user */
    srv_job *jp = new_job("{\"model\":\"mkad-tiny\",\"prompt\":[1,15,27,300,42,7,9,9,9,9,4,4,4],"
                          "\"max_tokens\":2,\"seed\":9,\"ignore_eos\":true}");
    srv_engine_submit(se, jp);
    int st = wait_event(SRV_EV_START, jp);
    ck_assert_int_eq(EV.ev[st].usage.cached_tokens, 8);
    wait_event(SRV_EV_FINAL, jp);
    ck_assert_int_ge(metric(m, "mkad_prefix_shared_tokens_total"), 8);
    /* another user's identical prompt shares nothing */
    srv_job *jo = new_job("{\"model\":\"mkad-tiny\",\"prompt\":[1,15,27,300,42,7,9,9,9,9,4,4,4],"
                          "\"max_tokens\":2,\"seed\":9,\"ignore_eos\":true}");
    snprintf(jo->req->user, sizeof jo->req->user, "other");
    srv_engine_submit(se, jo);
    st = wait_event(SRV_EV_START, jo);
    ck_assert_int_eq(EV.ev[st].usage.cached_tokens, 0);
    wait_event(SRV_EV_FINAL, jo);
    /* more choices than sequence slots can never run */
    srv_job *jn = new_job("{\"model\":\"mkad-tiny\",\"prompt\":[1,2],\"max_tokens\":2,\"n\":5}");
    srv_engine_submit(se, jn);
    f = wait_event(SRV_EV_FINAL, jn);
    ck_assert_int_eq(EV.ev[f].finish, SRV_FINISH_ERROR);
    ck_assert_int_eq(EV.ev[f].status, 400);
    srv_engine_stop(se);
    srv_job *all[] = { j3, j1, js, jp, jo, jn };
    for (size_t k = 0; k < sizeof all / sizeof *all; k++) free_job(all[k]);
    srv_metrics_free(m);
}
END_TEST

START_TEST(engine_cancel_frees_blocks)
{
    srv_config c = test_cfg();
    srv_metrics *m = srv_metrics_create();
    srv_engine *se = start_engine(&c, m);
    srv_job *j = new_job("{\"model\":\"mkad-tiny\",\"prompt\":[1,2,3],\"max_tokens\":250,\"ignore_eos\":true}");
    srv_engine_submit(se, j);
    wait_event(SRV_EV_TOKEN, j);
    atomic_store(&j->cancel, SRV_CANCEL_CLIENT);
    srv_engine_wake(se);
    int i = wait_event(SRV_EV_FINAL, j);
    ck_assert_int_eq(EV.ev[i].finish, SRV_FINISH_CANCELLED);
    ck_assert_int_lt(EV.ev[i].usage.completion_tokens, 250);
    /* the engine publishes its state after the step that dropped the job */
    for (int k = 0; k < 200 && metric(m, "mkad_kv_blocks_used") != 0; k++) usleep(5000);
    ck_assert_int_eq(metric(m, "mkad_kv_blocks_used"), 0);
    ck_assert_int_eq(metric(m, "mkad_sequences_running"), 0);
    srv_engine_stop(se);
    free_job(j);
    srv_metrics_free(m);
}
END_TEST

START_TEST(engine_preemption_is_exact)
{
    /* A small pool (1 MiB = tens of 8-token blocks) and two jobs that each
     * grow to just over half of it: both are admitted, the younger is
     * preempted when the pool runs dry and resumed by recomputation, and
     * both produce exactly the tokens they produce alone. */
    srv_config c = test_cfg();
    c.kv_mem_mb = 1;
    c.max_ctx = 1024;
    srv_metrics *m = srv_metrics_create();
    srv_engine *se = start_engine(&c, m);
    int nb = srv_engine_get_info(se)->n_blocks;
    ck_assert_int_ge(nb, 8);
    ck_assert_int_lt(nb, 120);
    int mt = (nb / 2 + 1) * 8 - 3; /* 3 prompt tokens: ceil((3 + mt) / 8) = nb/2 + 1 blocks */
    char b1[256], b2[256];
    snprintf(b1, sizeof b1, "{\"model\":\"mkad-tiny\",\"prompt\":[1,2,3],\"max_tokens\":%d,"
             "\"ignore_eos\":true,\"seed\":5,\"temperature\":1.5}", mt);
    snprintf(b2, sizeof b2, "{\"model\":\"mkad-tiny\",\"prompt\":[1,2,4],\"max_tokens\":%d,"
             "\"ignore_eos\":true,\"seed\":6,\"temperature\":1.5}", mt);
    srv_model_desc md = { "mkad-tiny", 4096, 1024, NULL, 16 };
    srv_error e;
    srv_job *jobs[5];
    const char *bodies[4] = { b1, b2, b1, b2 };
    for (int k = 0; k < 4; k++) {
        jobs[k] = calloc(1, sizeof *jobs[k]);
        ck_assert_int_eq(srv_genreq_parse(bodies[k], strlen(bodies[k]), 0, &md, NULL, &jobs[k]->req, &e), 0);
        job_choices(jobs[k]);
    }
    /* alone */
    srv_engine_submit(se, jobs[0]);
    wait_event(SRV_EV_FINAL, jobs[0]);
    srv_engine_submit(se, jobs[1]);
    wait_event(SRV_EV_FINAL, jobs[1]);
    ck_assert_int_eq(metric(m, "mkad_preemptions_total"), 0);
    /* together */
    srv_engine_submit(se, jobs[2]);
    srv_engine_submit(se, jobs[3]);
    int f2 = wait_event(SRV_EV_FINAL, jobs[2]);
    int f3 = wait_event(SRV_EV_FINAL, jobs[3]);
    int s3 = wait_event(SRV_EV_START, jobs[3]);
    ck_assert_int_lt(s3, f2); /* admitted while the other ran */
    ck_assert_int_eq(EV.ev[f2].finish, SRV_FINISH_LENGTH);
    ck_assert_int_eq(EV.ev[f3].finish, SRV_FINISH_LENGTH);
    ck_assert_int_ge(metric(m, "mkad_preemptions_total"), 1);
    int32_t *alone = malloc((size_t)mt * sizeof *alone), *both = malloc((size_t)mt * sizeof *both);
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(count_tokens(jobs[k], alone, mt), mt);
        ck_assert_int_eq(count_tokens(jobs[k + 2], both, mt), mt);
        ck_assert_mem_eq(alone, both, (size_t)mt * sizeof *alone);
    }
    free(alone);
    free(both);
    for (int k = 0; k < 200 && metric(m, "mkad_kv_blocks_used") != 0; k++) usleep(5000);
    ck_assert_int_eq(metric(m, "mkad_kv_blocks_used"), 0);
    /* a request that can never fit is refused, not queued forever */
    char bb[256];
    snprintf(bb, sizeof bb, "{\"model\":\"mkad-tiny\",\"prompt\":[1],\"max_tokens\":%d}", nb * 8 + 8);
    jobs[4] = calloc(1, sizeof *jobs[4]);
    ck_assert_int_eq(srv_genreq_parse(bb, strlen(bb), 0, &md, NULL, &jobs[4]->req, &e), 0);
    job_choices(jobs[4]);
    srv_engine_submit(se, jobs[4]);
    int fb = wait_event(SRV_EV_FINAL, jobs[4]);
    ck_assert_int_eq(EV.ev[fb].finish, SRV_FINISH_ERROR);
    ck_assert_int_eq(EV.ev[fb].status, 400);
    srv_engine_stop(se);
    for (int k = 0; k < 5; k++) free_job(jobs[k]);
    srv_metrics_free(m);
}
END_TEST

/* A token whose logprobs cannot be allocated is never dropped silently:
 * every TOKEN event carries its logprobs, and the job then ends with an
 * error (the stream ends with an error event) instead of missing text. */
START_TEST(engine_oom_ends_with_error)
{
    srv_config c = test_cfg();
    srv_metrics *m = srv_metrics_create();
    srv_engine *se = start_engine(&c, m);
    srv_job *j = new_job("{\"model\":\"mkad-tiny\",\"prompt\":[1,2,3],\"max_tokens\":20,"
                         "\"logprobs\":2,\"ignore_eos\":true,\"seed\":1}");
    fail_alloc(5, sizeof(srv_logprob)); /* the 6th token's logprobs */
    srv_engine_submit(se, j);
    int f = wait_event(SRV_EV_FINAL, j);
    fail_alloc_off();
    ck_assert(atomic_load(&FI.failed));
    ck_assert_int_eq(EV.ev[f].finish, SRV_FINISH_ERROR);
    ck_assert_int_eq(EV.ev[f].status, 500);
    int n = 0;
    pthread_mutex_lock(&EV.mu);
    for (int i = 0; i < EV.n; i++)
        if (EV.ev[i].type == SRV_EV_TOKEN && EV.ev[i].job == j) {
            ck_assert_ptr_nonnull(EV.ev[i].lp);
            n++;
        }
    pthread_mutex_unlock(&EV.mu);
    ck_assert_int_eq(n, 5);
    srv_engine_stop(se);
    free_job(j);
    srv_metrics_free(m);
}
END_TEST

/* The loop's side of a token (job.c): whichever allocation fails while a
 * token is taken (its id, its logprobs, its text, its SSE event), the job
 * ends at once with a 500 (a stream with an error event and no [DONE]) and
 * takes no later token: never a response with a token missing. */
START_TEST(job_token_oom_ends_with_error)
{
    srv_config c = test_cfg();
    srv_metrics *m = srv_metrics_create();
    srv_server s;
    memset(&s, 0, sizeof s);
    s.cfg = &c;
    s.met = m; /* s.eng NULL: cancelling wakes no engine */
    static const char *bodies[] = {
        "{\"model\":\"mkad-tiny\",\"prompt\":[1,2],\"max_tokens\":50}",
        "{\"model\":\"mkad-tiny\",\"prompt\":[1,2],\"max_tokens\":50,\"logprobs\":1}",
        "{\"model\":\"mkad-tiny\",\"prompt\":[1,2],\"max_tokens\":50,\"stream\":true}",
        "{\"model\":\"mkad-tiny\",\"prompt\":[1,2],\"max_tokens\":50,\"stream\":true,\"logprobs\":1}",
    };
    for (size_t b = 0; b < sizeof bodies / sizeof *bodies; b++) {
        int failures = 0, k;
        for (k = 0; k < 1000; k++) {
            srv_job *j = new_job(bodies[b]);
            j->refs = 1;
            int failed_at = -1;
            for (int t = 0; t < 100; t++) { /* the arrays and the text grow past 64 and 256 */
                srv_event ev = { .type = SRV_EV_TOKEN, .job = j, .token = 100 + t };
                if (j->req->logprobs) {
                    ev.lp = __real_calloc(1, sizeof *ev.lp); /* the loop frees it */
                    if (!ev.lp) ck_abort_msg("out of memory"); /* no ck_assert while armed: it allocates */
                    ev.lp->token = ev.token;
                }
                if (t == 20) fail_alloc(k, 0); /* from the 21st token on */
                srv_job_token(&s, j, &ev);
                if (t >= 20 && failed_at < 0 && atomic_load(&FI.failed)) failed_at = t;
            }
            fail_alloc_off();
            if (failed_at < 0) { /* every allocation of 80 tokens was tried */
                ck_assert(!j->finished);
                ck_assert_int_eq(j->ch[0].n_ids, 100);
                srv_job_unref(j);
                break;
            }
            failures++;
            ck_assert_msg(j->finished && j->finish == SRV_FINISH_ERROR, "body %zu k %d: finished %d finish %d at %d n_ids %d", b, k, j->finished, j->finish, failed_at, j->ch[0].n_ids);
            ck_assert_int_eq(j->error.status, 500);
            ck_assert_int_eq(atomic_load(&j->cancel), SRV_CANCEL_STOP);
            /* nothing taken after the failing token; the ids kept are the
             * tokens in order */
            ck_assert_int_le(j->ch[0].n_ids, failed_at + 1);
            ck_assert_int_ge(j->ch[0].n_ids, failed_at);
            for (int i = 0; i < j->ch[0].n_ids; i++) ck_assert_int_eq(j->ch[0].ids[i], 100 + i);
            if (j->req->stream) {
                ck_assert_ptr_null(strstr(j->sse.data ? j->sse.data : "", "[DONE]"));
                ck_assert(j->sse_broken || strstr(j->sse.data, "\"error\""));
            } else {
                ck_assert_ptr_null(j->body);
            }
            srv_job_unref(j);
        }
        ck_assert_int_gt(failures, 0);
        ck_assert_int_lt(k, 1000);
    }
    srv_metrics_free(m);
}
END_TEST

START_TEST(engine_load_failure)
{
    srv_config c = test_cfg();
    c.model = "/nonexistent/model";
    srv_metrics *m = srv_metrics_create();
    pthread_mutex_lock(&EV.mu);
    EV.n = 0;
    pthread_mutex_unlock(&EV.mu);
    srv_engine *se = NULL;
    ck_assert_int_eq(srv_engine_start(&c, m, collect, NULL, &se), 0);
    int i = wait_event(SRV_EV_LOAD_FAILED, NULL);
    ck_assert(EV.ev[i].msg[0] != '\0');
    srv_engine_stop(se);
    srv_metrics_free(m);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("server");
    TCase *api = tcase_create("api");
    tcase_add_test(api, parse_completion_valid);
    tcase_add_test(api, build_n_choices);
    tcase_add_test(api, parse_defaults);
    tcase_add_test(api, parse_penalties_and_bias);
    tcase_add_test(api, parse_echo);
    tcase_add_test(api, parse_session_header);
    tcase_add_test(api, parse_rejects);
    tcase_add_test(api, parse_no_tokenizer_message);
    tcase_add_test(api, error_object);
    tcase_add_test(api, error_object_utf8);
    tcase_add_test(api, build_completion_json);
    tcase_add_test(api, sse_framing);
    tcase_add_test(api, sse_no_partial_event);
    tcase_add_test(api, stop_scan);
    tcase_add_test(api, token_text);
    tcase_add_test(api, parse_with_tokenizer);
    tcase_add_test(api, auth_fails_closed);
    tcase_add_test(api, tokenize_shapes);
    suite_add_tcase(s, api);
    TCase *sched = tcase_create("sched");
    tcase_add_test(sched, plan_decoders_and_chunks);
    tcase_add_test(sched, plan_fifo_prefill);
    tcase_add_test(sched, plan_more_decoders_than_budget);
    tcase_add_test(sched, plan_cost_model);
    tcase_add_test(sched, plan_time_budget);
    tcase_add_test(sched, plan_time_budget_progress);
    tcase_add_test(sched, reuse_prefix);
    tcase_add_test(sched, resume_cost_model);
    tcase_add_test(sched, l3_index_sync);
    suite_add_tcase(s, sched);
    TCase *eng = tcase_create("engine_thread");
    tcase_set_timeout(eng, 120);
    tcase_add_test(eng, engine_generate_and_sessions);
    tcase_add_test(eng, engine_cancel_frees_blocks);
    tcase_add_test(eng, engine_n_choices_and_prefix_sharing);
    tcase_add_test(eng, engine_preemption_is_exact);
    tcase_add_test(eng, engine_oom_ends_with_error);
    tcase_add_test(eng, job_token_oom_ends_with_error);
    tcase_add_test(eng, engine_load_failure);
    suite_add_tcase(s, eng);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
