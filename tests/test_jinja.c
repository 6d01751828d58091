/*
 * test_jinja.c — the Jinja interpreter (engine/jinja*.c): what it renders
 * (each expected text below was rendered by Python's jinja2 3.1 in the
 * environment transformers builds: ImmutableSandboxedEnvironment,
 * trim_blocks, lstrip_blocks, loopcontrols, its tojson/strftime_now), its
 * errors (with the template line), its bounds, and which output bytes it
 * marks untrusted.
 *
 * With --render CASES.json it is the C side of tests/chat_templates.sh:
 * it renders each case through the engine's chat API (eng_tok_chat_apply
 * and eng_tok_chat_encode) and prints the results as JSON.
 */
#include "config.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "engine.h"
#include "jinja.h"

/* the variables of every case of the render table */
static const char *VARS =
    "{\"msgs\": [{\"role\": \"system\", \"content\": \" Be brief. \"}, {\"role\": \"user\", \"content\": \"Hi \\u00e9\"}, {\"role\": \"assistant\", \"content\": \"Yo\", \"tool_calls\": [{\"function\": {\"name\": \"f\", \"arguments\": {\"a\": 1, \"b\": [true, null, 2.5]}}}]}], \"d\": {\"b\": 1, \"a\": \"x\\n\\\"q\\\"\"}, \"s\": \"  Hello, World  \", \"n\": 7, \"f\": 2.5, \"none\": null, \"t\": true, \"l\": [3, 1, 2]}";

static const struct {
    const char *tpl, *want;
} RENDER[] = {
    { "{% if n > 5 %}big{% elif n > 2 %}mid{% else %}small{% endif %}",
      "big" },
    { "{% for m in msgs %}{{ loop.index }}/{{ loop.length }}:{{ m.role }}{% if not loop.last %},{% endif %}{% endfor %}",
      "1/3:system,2/3:user,3/3:assistant" },
    { "{% for m in msgs %}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.previtem.role if loop.previtem is defined else '-' }}{{ loop.nextitem.role if loop.nextitem is defined else '-' }};{% endfor %}",
      "032True-user;121Falsesystemassistant;210Falseuser-;" },
    { "{% for x in [] %}a{% else %}empty{% endfor %}",
      "empty" },
    { "{% for m in msgs if m.role != 'system' %}{{ m.role }}{{ loop.length }}{% endfor %}",
      "user2assistant2" },
    { "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}",
      "b=1;a=x\n\"q\";" },
    { "{% for i in range(10) %}{% if i is even %}{% continue %}{% endif %}{% if i > 6 %}{% break %}{% endif %}{{ i }}{% endfor %}",
      "135" },
    { "{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + i %}{{ x }}{% endfor %}{{ x }}",
      "231" },
    { "{% set ns = namespace(total=0, seen=[]) %}{% for i in l %}{% set ns.total = ns.total + i %}{% endfor %}{{ ns.total }}",
      "6" },
    { "{% set a, b = 'xy' %}{{ b }}{{ a }}",
      "yx" },
    { "{% set block %}A{{ n }}B{% endset %}[{{ block }}]",
      "[A7B]" },
    { "{% set up | upper %}shout {{ s | trim }}{% endset %}{{ up }}",
      "SHOUT HELLO, WORLD" },
    { "{% macro greet(name, punct='!') %}Hello {{ name }}{{ punct }}{% endmacro %}{{ greet('a') }} {{ greet('b', '?') }} {{ greet(punct='.', name='c') }}",
      "Hello a! Hello b? Hello c." },
    { "{% macro wrap() %}[{{ caller() }}]{% endmacro %}{% call wrap() %}inside{% endcall %}",
      "[inside]" },
    { "{% filter upper %}quiet {{ n }}{% endfilter %}",
      "QUIET 7" },
    { "{% with a = 2, b = 3 %}{{ a * b }}{% endwith %}",
      "6" },
    { "{# a comment #}x{% raw %}{{ raw }}{% endraw %}y",
      "x{{ raw }}y" },
    { "{% generation %}gen{% endgeneration %}",
      "gen" },
    { "a\n  {% if true %}\n  b\n  {% endif %}\nc\n",
      "a\n  b\nc" },
    { "a  {{- ' b ' -}}  c {%- if true %} d {% endif -%}\n e",
      "a b c d e" },
    { "  {%+ if true %}x{% endif %}\n{%- if true +%}\ny{% endif %}",
      "  x\ny" },
    { "line\n    {# c #}\nnext",
      "line\nnext" },
    { "{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 7 / 2 }} {{ 1 - -1 }}",
      "7 9 3 -4 1 2 1024 3.5 2" },
    { "{{ 'a' ~ n ~ none ~ t }} {{ 'a' + 'b' }} {{ [1] + [2] }} {{ 'ab' * 3 }}",
      "a7NoneTrue ab [1, 2] ababab" },
    { "{{ 1 < 2 < 3 }} {{ 3 > 2 > 5 }} {{ 1 == 1.0 }} {{ 'a' != 'b' }} {{ 'b' >= 'a' }}",
      "True False True True True" },
    { "{{ 'ell' in s }} {{ 4 not in l }} {{ 'a' in d }} {{ n is not none }} {{ none is none }}",
      "True True True True True" },
    { "{{ 'yes' if t else 'no' }} {{ 'x' if false }}|{{ t and 'A' }} {{ none or 'B' }} {{ not l }}",
      "yes |A B False" },
    { "{{ [1, 'two', none, 2.5, true] }} {{ {'k': [1, 2]} }} {{ (1,) }} {{ ('a', 'b') }} {{ none }} {{ f }} {{ 1e16 }} {{ 0.1 + 0.2 }}",
      "[1, 'two', None, 2.5, True] {'k': [1, 2]} (1,) ('a', 'b') None 2.5 1e+16 0.30000000000000004" },
    { "{{ s[2:7] }}|{{ s[::-1] }}|{{ l[-1] }}|{{ l[1:] }}|{{ l[::2] }}|{{ 'h\xc3""\xa9""llo'[1] }}|{{ 'h\xc3""\xa9""llo'[-2:] }}",
      "Hello|  dlroW ,olleH  |2|[1, 2]|[3, 2]|\xc3""\xa9""|lo" },
    { "{{ msgs[0].role }} {{ msgs[1]['content'] }} {{ msgs[2].tool_calls[0].function.arguments.b[2] }} {{ d.missing is defined }} {{ d['missing'] is undefined }}",
      "system Hi \xc3""\xa9"" 2.5 False True" },
    { "{{ \"single 'q'\" }} {{ 'tab\\there' }} {{ 'uni\\u00e9\\x41' }} {{ 'adj' 'acent' }}",
      "single 'q' tab\there uni\xc3""\xa9""A adjacent" },
    { "{{ s | trim }}|{{ s | length }}|{{ l | length }}|{{ l | count }}|{{ s | upper }}|{{ s | lower }}|{{ 'hELLO wORLD' | capitalize }}|{{ 'hello big-world' | title }}",
      "Hello, World|16|3|3|  HELLO, WORLD  |  hello, world  |Hello world|Hello Big-World" },
    { "{{ l | join(', ') }}|{{ msgs | map(attribute='role') | join('|') }}|{{ l | sort | list }}|{{ l | sort(reverse=true) | first }}|{{ l | last }}|{{ l | max }}|{{ l | min }}|{{ l | sum }}",
      "3, 1, 2|system|user|assistant|[1, 2, 3]|3|2|3|1|6" },
    { "{{ msgs | selectattr('role', 'equalto', 'user') | list | length }}|{{ msgs | rejectattr('role', 'eq', 'user') | map(attribute='role') | list }}|{{ msgs | selectattr('tool_calls', 'defined') | list | length }}",
      "1|['system', 'assistant']|1" },
    { "{{ [0, 1, '', 'x', none] | select | list }}|{{ [1, 2, 3, 4] | reject('odd') | list }}|{{ [3, 1, 3] | unique | list }}|{{ 'abc' | list }}|{{ l | reverse | list }}",
      "[1, 'x']|[2, 4]|[3, 1]|['a', 'b', 'c']|[2, 1, 3]" },
    { "{{ undefined_var | default('dflt') }}|{{ '' | default('e', true) }}|{{ none | d('n') }}|{{ n | string ~ '!' }}|{{ '42' | int + 1 }}|{{ 'x' | int }}|{{ '2.5' | float }}|{{ 3.9 | int }}",
      "dflt|e|None|7!|43|0|2.5|3" },
    { "{{ d | tojson }}|{{ msgs[2] | tojson }}|{{ d | tojson(indent=2) }}|{{ '\xc3""\xa9""\\n' | tojson }}|{{ '\xc3""\xa9""' | tojson(ensure_ascii=true) }}|{{ d | tojson(sort_keys=true) }}",
      "{\"b\": 1, \"a\": \"x\\n\\\"q\\\"\"}|{\"role\": \"assistant\", \"content\": \"Yo\", \"tool_calls\": [{\"function\": {\"name\": \"f\", \"arguments\": {\"a\": 1, \"b\": [true, null, 2.5]}}}]}|{\n  \"b\": 1,\n  \"a\": \"x\\n\\\"q\\\"\"\n}|\"\xc3""\xa9""\\n\"|\"\\u00e9\"|{\"a\": \"x\\n\\\"q\\\"\", \"b\": 1}" },
    { "{{ d | items | list }}|{{ d | dictsort }}|{{ {'b': 1, 'a': 2} | dictsort(by='value', reverse=true) | first }}|{{ 'a b' | replace(' ', '_') }}|{{ 'aXbXc' | replace('X', '', 1) }}",
      "[('b', 1), ('a', 'x\\n\"q\"')]|[('a', 'x\\n\"q\"'), ('b', 1)]|('a', 2)|a_b|abXc" },
    { "{{ 'one\\ntwo\\n\\nthree' | indent(2) }}|{{ 'a\\nb' | indent(4, true) }}|{{ '<p>Hi <b>there</b></p>' | striptags }}|{{ '<&>' | escape }}|{{ 'x' | safe }}|{{ -3 | abs }}|{{ 2.567 | round(1) }}",
      "one\n  two\n\n  three|    a\n    b|Hi there|&lt;&amp;&gt;|x|3|2.6" },
    { "{{ '%s-%d' | format('a', 5) }}|{{ 'w1 w2  w3' | wordcount }}|{{ 'xxhixx' | trim('x') }}|{{ [[1, 2], [3]] | map('length') | list }}|{{ ['b', 'A', 'c'] | sort | join }}",
      "a-5|3|hi|[2, 1]|Abc" },
    { "{{ n is number }}{{ f is float }}{{ n is integer }}{{ s is string }}{{ d is mapping }}{{ l is sequence }}{{ l is iterable }}{{ t is boolean }}{{ t is true }}{{ n is odd }}{{ 10 is divisibleby 5 }}{{ 2 is in l }}{{ n is eq 7 }}{{ n is gt 3 }}{{ undefined_var is undefined }}{{ d is defined }}",
      "TrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrue" },
    { "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.strip(' H') }}|{{ s.split(',') }}|{{ s.split() }}|{{ 'a.b.c'.rsplit('.', 1) }}|{{ s.replace('l', 'L') }}|{{ s.upper() }}|{{ s.lower() }}",
      "Hello, World|Hello, World  |  Hello, World|ello, World|['  Hello', ' World  ']|['Hello,', 'World']|['a.b', 'c']|  HeLLo, WorLd  |  HELLO, WORLD  |  hello, world  " },
    { "{{ s.strip().startswith('Hell') }}|{{ s.endswith(('x', '  ')) }}|{{ 'hello world'.title() }}|{{ 'x'.capitalize() }}|{{ s.find('W') }}|{{ s.count('l') }}|{{ '{} and {}'.format(1, 'b') }}|{{ 'a\\nb'.splitlines() }}",
      "True|True|Hello World|X|9|3|1 and b|['a', 'b']" },
    { "{{ d.get('a') }}|{{ d.get('zz', 'none') }}|{{ d.get('zz') }}|{{ d.keys() | list }}|{{ d.values() | list | length }}|{{ d.items() | list | first }}",
      "x\n\"q\"|none|None|['b', 'a']|2|('b', 1)" },
    { "{{ range(3) | list }}|{{ range(1, 10, 4) | list }}|{{ dict(a=1, b=2) }}|{{ namespace(x=1).x }}|{{ strftime_now('%Y-%m-%d %H:%M') }}",
      "[0, 1, 2]|[1, 5, 9]|{'a': 1, 'b': 2}|1|2023-11-14 22:13" },
    { "{%- if msgs[0].role == 'system' %}{%- set sys = msgs[0].content | trim %}{%- set rest = msgs[1:] %}{%- else %}{%- set sys = '' %}{%- set rest = msgs %}{%- endif %}[{{ sys }}]{% for m in rest %}<{{ m.role }}>{{ m.content }}{% endfor %}",
      "[Be brief.]<user>Hi \xc3""\xa9""<assistant>Yo" },
    { "{%- for m in msgs %}\n    {%- if m.role == 'assistant' and m.tool_calls is defined %}\n        {{- '<tool>' + m.tool_calls[0].function.name + '(' + m.tool_calls[0].function.arguments | tojson + ')' }}\n    {%- else %}\n        {{- '<' + m.role + '>' + m.content }}\n    {%- endif %}\n{%- endfor %}\n",
      "<system> Be brief. <user>Hi \xc3""\xa9""<tool>f({\"a\": 1, \"b\": [true, null, 2.5]})" },
};

/* Renders src with the JSON object vars_json as variables (strings
 * untrusted unless trusted_all), fixed clock.  Returns the status;
 * out and err are filled. */
static int render_ex(const char *src, const char *vars_json, int trusted_all, const jj_render_params *rp,
                     jj_result *out, char *err, size_t errlen)
{
    jj_template *t = NULL;
    int rc = jj_parse(src, strlen(src), &t, err, errlen);
    if (rc) return rc;
    jj_vars *v;
    ck_assert_int_eq(jj_vars_create(&v), 0);
    if (vars_json) {
        json_error_t je;
        json_t *o = json_loads(vars_json, 0, &je);
        ck_assert_msg(o != NULL, "vars: %s", je.text);
        const char *k;
        json_t *x;
        json_object_foreach(o, k, x) {
            if (trusted_all && json_is_string(x)) jj_vars_set_string(v, k, json_string_value(x), json_string_length(x), 1);
            else jj_vars_set_json(v, k, x, NULL, NULL);
        }
        json_decref(o);
    }
    jj_render_params p = rp ? *rp : jj_default_render_params();
    if (!p.now) p.now = 1700000000;
    rc = jj_render(t, v, &p, out, err, errlen);
    jj_vars_free(v);
    jj_template_free(t);
    return rc;
}

START_TEST(renders_like_jinja2)
{
    setenv("TZ", "UTC", 1);
    tzset();
    for (size_t i = 0; i < sizeof RENDER / sizeof *RENDER; i++) {
        jj_result r;
        char err[512];
        int rc = render_ex(RENDER[i].tpl, VARS, 0, NULL, &r, err, sizeof err);
        ck_assert_msg(rc == 0, "case %zu %s: %s", i, RENDER[i].tpl, err);
        ck_assert_msg(r.len == strlen(RENDER[i].want) && memcmp(r.text, RENDER[i].want, r.len) == 0,
                      "case %zu %s:\n got  [%s]\n want [%s]", i, RENDER[i].tpl, r.text, RENDER[i].want);
        jj_result_free(&r);
    }
}
END_TEST

static void expect_error(const char *src, const char *vars, int status, const char *substr)
{
    jj_result r = { 0 };
    char err[512] = "";
    int rc = render_ex(src, vars, 0, NULL, &r, err, sizeof err);
    ck_assert_msg(rc == status, "%s: status %d, want %d (%s)", src, rc, status, err);
    ck_assert_msg(strstr(err, substr) != NULL, "%s: error [%s] lacks [%s]", src, err, substr);
    ck_assert_ptr_null(r.text);
}

START_TEST(syntax_errors_name_the_line)
{
    expect_error("a\n{% if x %}\nb\n", NULL, JJ_ESYNTAX, "line 3: Unexpected end of template");
    expect_error("{% include 'other.jinja' %}", NULL, JJ_ESYNTAX, "line 1: '{% include %}' is not supported");
    expect_error("x\n\n{% frobnicate %}", NULL, JJ_ESYNTAX, "line 3: Encountered unknown tag 'frobnicate'");
    expect_error("{{ x | nosuch }}", NULL, JJ_ESYNTAX, "line 1: No filter named 'nosuch'");
    expect_error("\n{{ x is nosuch }}", NULL, JJ_ESYNTAX, "line 2: No test named 'nosuch'");
    expect_error("{{ (1 + }}", NULL, JJ_ESYNTAX, "line 1:");
    expect_error("{{ 'unterminated }}", NULL, JJ_ESYNTAX, "string literal");
    expect_error("{# never closed", NULL, JJ_ESYNTAX, "comment");
    expect_error("{% for x in y %}{% endif %}", NULL, JJ_ESYNTAX, "endif");
    expect_error("{% break %}", NULL, JJ_ESYNTAX, "outside of a loop");
    expect_error("{{ a.b c }}", NULL, JJ_ESYNTAX, "expected end of print statement");
    /* jinja2 defers an unknown filter inside an if to run time: only that branch fails */
    jj_result r;
    char err[512];
    ck_assert_int_eq(render_ex("{% if false %}{{ x | from_json }}{% endif %}ok", NULL, 0, NULL, &r, err, sizeof err), 0);
    ck_assert_str_eq(r.text, "ok");
    jj_result_free(&r);
    expect_error("\n{% if true %}{{ x | from_json }}{% endif %}", NULL, JJ_ERUNTIME, "line 2: No filter named 'from_json' found");
    /* nesting a parser could overflow its stack on is an error, not a crash */
    char deep[20000];
    size_t n = 0;
    n += (size_t)snprintf(deep, sizeof deep, "{{ ");
    for (int i = 0; i < 5000; i++) deep[n++] = '(';
    deep[n++] = '1';
    for (int i = 0; i < 5000; i++) deep[n++] = ')';
    snprintf(deep + n, sizeof deep - n, " }}");
    expect_error(deep, NULL, JJ_ESYNTAX, "too deeply");
}
END_TEST

START_TEST(runtime_errors)
{
    const char *vars = "{\"m\": {\"role\": \"user\"}, \"n\": 1}";
    expect_error("ok\n{{ m.content.strip() }}", vars, JJ_ERUNTIME, "line 2: 'dict object' has no attribute 'content'");
    expect_error("{{ nope.x }}", vars, JJ_ERUNTIME, "line 1: 'nope' is undefined");
    expect_error("\n\n{{ 'a' + n }}", vars, JJ_ERUNTIME, "line 3: can only concatenate str");
    expect_error("{{ n / 0 }}", vars, JJ_ERUNTIME, "division by zero");
    expect_error("{{ m | tojson(indent=2) if false else nope | tojson }}", vars, JJ_ERUNTIME, "not JSON serializable");
    expect_error("{% set l = [] %}{{ l.append(1) }}", vars, JJ_ERUNTIME, "unsafe");
    expect_error("{% set ns = namespace() %}{% set ns._p = 1 %}", vars, JJ_ERUNTIME, "underscore");
    expect_error("{% set m2 = m %}{% set m2.x = 1 %}", vars, JJ_ERUNTIME, "non-namespace");
    /* a message cut to the buffer never ends inside a UTF-8 character */
    for (int shift = 0; shift < 3; shift++) {
        char src[2048], err[100];
        int n = snprintf(src, sizeof src, "{{ raise_exception('%.*s", shift, "ab");
        for (int i = 0; i < 300; i++) n += snprintf(src + n, sizeof src - (size_t)n, "\xc3\xa9");
        snprintf(src + n, sizeof src - (size_t)n, "') }}");
        jj_result r = { 0 };
        ck_assert_int_eq(render_ex(src, NULL, 0, NULL, &r, err, sizeof err), JJ_ERAISE);
        json_t *j = json_string(err); /* NULL for invalid UTF-8 */
        ck_assert_msg(j != NULL, "shift %d: cut inside a character", shift);
        json_decref(j);
    }
    /* raise_exception: its message, as it is */
    expect_error("{% if m.role != 'system' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}",
                 vars, JJ_ERAISE, "Conversation roles must alternate user/assistant/user/assistant/...");
}
END_TEST

START_TEST(bounded)
{
    jj_result r;
    char err[512];
    jj_render_params p = jj_default_render_params();
    p.limits.max_steps = 200000;
    time_t t0 = time(NULL);
    /* time: 10^15 iterations stop at the step bound */
    ck_assert_int_eq(render_ex("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
                               "{% endfor %}{% endfor %}{% endfor %}", NULL, 0, &p, &r, err, sizeof err), JJ_ELIMIT);
    ck_assert_ptr_nonnull(strstr(err, "steps"));
    ck_assert_int_le(time(NULL) - t0, 5);
    /* output */
    p = jj_default_render_params();
    p.limits.max_output = 1 << 20;
    ck_assert_int_eq(render_ex("{% for a in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxx' }}{% endfor %}", NULL, 0, &p, &r, err,
                               sizeof err), JJ_ELIMIT);
    ck_assert_int_eq(render_ex("{{ 'x' * 100000000000 }}", NULL, 0, &p, &r, err, sizeof err), JJ_ELIMIT);
    /* memory: a string doubling in a namespace */
    p = jj_default_render_params();
    p.limits.max_memory = 8 << 20;
    ck_assert_int_eq(render_ex("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                               NULL, 0, &p, &r, err, sizeof err), JJ_ELIMIT);
    ck_assert_ptr_nonnull(strstr(err, "memory"));
    /* depth: a macro that calls itself */
    ck_assert_int_eq(render_ex("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", NULL, 0, NULL, &r, err, sizeof err),
                     JJ_ELIMIT);
    /* the sandbox's range bound */
    expect_error("{{ range(100001) | length }}", NULL, JJ_ERUNTIME, "Range too big");
}
END_TEST

/* Which bytes came from the caller's data. */
START_TEST(untrusted_ranges)
{
    jj_template *t;
    char err[256];
    const char *src = "<|a|>{{ user }}<|b|>{{ tok }}{{ (user ~ '<|c|>') | trim }}{{ [user] | tojson }}{{ n }}";
    ck_assert_int_eq(jj_parse(src, strlen(src), &t, err, sizeof err), 0);
    jj_vars *v;
    jj_vars_create(&v);
    jj_vars_set_string(v, "user", " hi ", 4, 0);
    jj_vars_set_string(v, "tok", "<s>", 3, 1);
    json_t *n = json_integer(5);
    jj_vars_set_json(v, "n", n, NULL, NULL);
    json_decref(n);
    jj_result r;
    ck_assert_int_eq(jj_render(t, v, NULL, &r, err, sizeof err), 0);
    ck_assert_str_eq(r.text, "<|a|> hi <|b|><s>hi <|c|>[\" hi \"]5");
    /* " hi " at 5..9; "hi " at 17..20 (the trimmed copy keeps its range); the JSON wholly */
    ck_assert_int_eq(r.n_untrusted, 3);
    ck_assert_int_eq(r.untrusted[0].start, 5);
    ck_assert_int_eq(r.untrusted[0].end, 9);
    ck_assert_int_eq(r.untrusted[1].start, 17);
    ck_assert_int_eq(r.untrusted[1].end, 20);
    ck_assert_int_eq(r.untrusted[2].start, 25);
    ck_assert_int_eq(r.untrusted[2].end, 33);
    jj_result_free(&r);
    jj_vars_free(v);
    jj_template_free(t);
}
END_TEST

/* ---- --render: the C side of tests/chat_templates.sh ------------------------- */

/* cases.json: {"cases": [{"dir": DIR, "request": {messages, tools, documents,
 * chat_template_kwargs, add_generation_prompt, continue_final_message},
 * "now": N}, ...]}.  Prints [{"text": ...} or {"error": ..., "status": N},
 * with "ids_match": whether the encoding that reads special tokens only
 * from the template equals encoding the text with every special token
 * read (true for data without special-token text)] */
static int render_mode(const char *path)
{
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) {
        fprintf(stderr, "test_jinja --render: %s: line %d: %s\n", path, je.line, je.text);
        return 2;
    }
    json_t *out = json_array(), *c;
    size_t i;
    eng_tok *tok = NULL;
    char *tok_dir = NULL;
    json_array_foreach(json_object_get(root, "cases"), i, c) {
        const char *dir = json_string_value(json_object_get(c, "dir"));
        char err[1024] = "";
        if (!tok_dir || strcmp(tok_dir, dir)) {
            eng_tok_free(tok);
            tok = NULL;
            free(tok_dir);
            tok_dir = strdup(dir);
            if (eng_tok_load(dir, &tok, err, sizeof err)) {
                fprintf(stderr, "test_jinja --render: %s: %s\n", dir, err);
                return 2;
            }
        }
        eng_chat_params p;
        eng_chat_params_from_json(&p, json_object_get(c, "request"));
        p.now = json_integer_value(json_object_get(c, "now"));
        char *text = NULL;
        size_t tl = 0;
        int rc = eng_tok_chat_apply(tok, &p, &text, &tl, err, sizeof err);
        json_t *res;
        if (rc) {
            res = json_pack("{s:s, s:i}", "error", err, "status", rc);
        } else {
            int32_t *a = NULL, *b = NULL;
            size_t na = 0, nb = 0;
            int ok = eng_tok_chat_encode(tok, &p, &a, &na, err, sizeof err) == 0 &&
                     eng_tok_encode(tok, text, tl, ENG_TOK_ALLOW_SPECIAL, &b, &nb, err, sizeof err) == 0 &&
                     na == nb && (na == 0 || memcmp(a, b, na * sizeof *a) == 0);
            res = json_pack("{s:s%, s:b}", "text", text, tl, "ids_match", ok);
            free(a);
            free(b);
        }
        free(text);
        json_array_append_new(out, res);
    }
    char *s = json_dumps(out, JSON_ENSURE_ASCII);
    puts(s);
    free(s);
    json_decref(out);
    json_decref(root);
    eng_tok_free(tok);
    free(tok_dir);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--render") == 0) return render_mode(argv[2]);
    Suite *s = suite_create("jinja");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, renders_like_jinja2);
    tcase_add_test(tc, syntax_errors_name_the_line);
    tcase_add_test(tc, runtime_errors);
    tcase_add_test(tc, bounded);
    tcase_add_test(tc, untrusted_ranges);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
