/*
 * safetensors.c — maps and validates safetensors files and sharded
 * checkpoints (see safetensors.h for the rules).  Never prints, never exits;
 * every failure releases what was acquired and returns a status with one
 * line in err naming the file and the field.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "internal.h"
#include "safetensors.h"

/* ---- small helpers -------------------------------------------------------- */

static char *st_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

/* dir + "/" + name in a new allocation (caller frees), NULL when out of memory. */
static char *st_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, name, b + 1);
    return p;
}

static int st_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

void eng_st_shape_str(const int64_t *shape, int ndim, char *buf, size_t len)
{
    size_t o = 0;
    if (len == 0) return;
    buf[0] = '\0';
    o += (size_t)snprintf(buf + o, len - o, "[");
    for (int i = 0; i < ndim && o < len; i++)
        o += (size_t)snprintf(buf + o, len - o, i ? ",%lld" : "%lld", (long long)shape[i]);
    if (o < len) snprintf(buf + o, len - o, "]");
}

int eng_st_read_file(const char *path, const char *name, size_t max_len, char **buf,
                     size_t *len, char *err, size_t errlen)
{
    *buf = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return eng__errf(err, errlen, ENG_EIO, "%s: cannot open '%s': %s", name, path,
                         strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return eng__errf(err, errlen, ENG_EIO, "%s: cannot stat '%s': %s", name, path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return eng__errf(err, errlen, ENG_EIO, "%s: '%s' is not a regular file", name, path);
    }
    if ((uint64_t)st.st_size > (uint64_t)max_len) {
        close(fd);
        return eng__errf(err, errlen, ENG_EFORMAT, "%s: file is %lld bytes, larger than the %zu-byte limit",
                         name, (long long)st.st_size, max_len);
    }
    size_t n = (size_t)st.st_size;
    char *p = malloc(n + 1);
    if (!p) {
        close(fd);
        return eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory reading %zu bytes", name, n);
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, p + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            int e = r < 0 ? errno : EIO;
            free(p);
            close(fd);
            return eng__errf(err, errlen, ENG_EIO, "%s: cannot read '%s': %s", name, path,
                             r < 0 ? strerror(e) : "file shrank while reading");
        }
        got += (size_t)r;
    }
    close(fd);
    p[n] = '\0';
    *buf = p;
    *len = n;
    return ENG_OK;
}

/* ---- dtypes ----------------------------------------------------------------- */

/* Element size of a safetensors dtype string, 0 when unknown; *kind receives
 * the engine's class for it. */
static size_t st_dtype_size(const char *s, int *kind)
{
    static const struct { const char *name; size_t size; int kind; } tab[] = {
        {"F32", 4, ENG_ST_F32},   {"F16", 2, ENG_ST_F16},   {"BF16", 2, ENG_ST_BF16},
        {"F64", 8, ENG_ST_OTHER}, {"I64", 8, ENG_ST_OTHER}, {"U64", 8, ENG_ST_OTHER},
        {"I32", 4, ENG_ST_OTHER}, {"U32", 4, ENG_ST_OTHER}, {"I16", 2, ENG_ST_OTHER},
        {"U16", 2, ENG_ST_OTHER}, {"I8", 1, ENG_ST_OTHER},  {"U8", 1, ENG_ST_OTHER},
        {"BOOL", 1, ENG_ST_OTHER}, {"F8_E5M2", 1, ENG_ST_OTHER}, {"F8_E4M3", 1, ENG_ST_OTHER},
        {"F8_E8M0", 1, ENG_ST_OTHER}, {"C64", 8, ENG_ST_OTHER},
    };
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
        if (strcmp(s, tab[i].name) == 0) {
            *kind = tab[i].kind;
            return tab[i].size;
        }
    return 0;
}

const char *eng_st_dtype_lower(int dtype)
{
    switch (dtype) {
    case ENG_ST_F32: return "f32";
    case ENG_ST_F16: return "f16";
    case ENG_ST_BF16: return "bf16";
    default: return "other";
    }
}

float eng_st_bf16_to_f32(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

float eng_st_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign; /* signed zero */
        } else {
            /* Subnormal: value = mant * 2^-24.  Shift the mantissa up until
             * its leading one reaches the implicit-bit position (bit 10); each
             * shift lowers the exponent by one.  With s shifts the value is
             * 1.m * 2^(-14 - s), i.e. f32 biased exponent 127 - 14 - s. */
            int s = 0;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                s++;
            }
            bits = sign | ((uint32_t)(127 - 14 - s) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13); /* inf, or NaN keeping its payload */
    } else {
        bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

void eng_st_to_f32(const eng_st_tensor *t, float *dst)
{
    const unsigned char *p = t->data;
    size_t n = (size_t)t->numel;
    /* safetensors is little-endian; assembling the bytes keeps this correct
     * on any host and compiles to plain loads on little-endian ones. */
    switch (t->dtype) {
    case ENG_ST_F32:
        for (size_t i = 0; i < n; i++, p += 4) {
            uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                         (uint32_t)p[3] << 24;
            memcpy(&dst[i], &u, 4);
        }
        break;
    case ENG_ST_F16:
        for (size_t i = 0; i < n; i++, p += 2)
            dst[i] = eng_st_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
        break;
    case ENG_ST_BF16:
        for (size_t i = 0; i < n; i++, p += 2)
            dst[i] = eng_st_bf16_to_f32((uint16_t)(p[0] | p[1] << 8));
        break;
    default:
        break; /* callers check the dtype first */
    }
}

void eng_st_to_bf16(const eng_st_tensor *t, uint16_t *dst)
{
    const unsigned char *p = t->data;
    for (size_t i = 0; i < (size_t)t->numel; i++, p += 2) dst[i] = (uint16_t)(p[0] | p[1] << 8);
}

/* ---- one file ------------------------------------------------------------ */

static int st_cmp_name(const void *a, const void *b)
{
    const eng_st_tensor *x = a, *y = b;
    return strcmp(x->name, y->name);
}

static int st_cmp_offset(const void *a, const void *b)
{
    const eng_st_tensor *x = *(const eng_st_tensor *const *)a;
    const eng_st_tensor *y = *(const eng_st_tensor *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

void eng_st_close(eng_st_file *f)
{
    if (!f) return;
    if (f->map) munmap(f->map, f->map_len);
    if (f->header) json_decref(f->header);
    free(f->tensors);
    free(f->name);
    free(f);
}

/* Parses one header entry into t.  data_len is the size of the data section. */
static int st_parse_tensor(const char *fname, const char *key, json_t *v, eng_st_tensor *t,
                           char *err, size_t errlen)
{
    if (!json_is_object(v))
        return eng__errf(err, errlen, ENG_EFORMAT, "%s: tensor '%s': header entry must be an object",
                         fname, key);
    t->name = key;
    json_t *dt = json_object_get(v, "dtype");
    if (!json_is_string(dt))
        return eng__errf(err, errlen, ENG_EFORMAT, "%s: tensor '%s': field 'dtype' must be a string",
                         fname, key);
    t->dtype_name = json_string_value(dt);
    size_t esize = st_dtype_size(t->dtype_name, &t->dtype);
    if (esize == 0)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "%s: tensor '%s' has dtype %s, only F32, F16 and BF16 are supported", fname,
                         key, t->dtype_name);

    json_t *sh = json_object_get(v, "shape");
    if (!json_is_array(sh))
        return eng__errf(err, errlen, ENG_EFORMAT, "%s: tensor '%s': field 'shape' must be an array",
                         fname, key);
    size_t nd = json_array_size(sh);
    if (nd > ENG_ST_MAX_DIMS)
        return eng__errf(err, errlen, ENG_EUNSUPPORTED,
                         "%s: tensor '%s' has %zu dimensions, at most %d are supported", fname, key, nd,
                         ENG_ST_MAX_DIMS);
    t->ndim = (int)nd;
    uint64_t numel = 1;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(sh, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0)
            return eng__errf(err, errlen, ENG_EFORMAT,
                             "%s: tensor '%s': field 'shape' must hold non-negative integers", fname,
                             key);
        uint64_t dim = (uint64_t)json_integer_value(d);
        t->shape[i] = (int64_t)dim;
        if (dim != 0 && numel > UINT64_MAX / dim)
            return eng__errf(err, errlen, ENG_EFORMAT, "%s: tensor '%s': shape overflows", fname, key);
        numel *= dim;
    }
    if (numel > UINT64_MAX / esize || numel * esize > (uint64_t)SIZE_MAX)
        return eng__errf(err, errlen, ENG_EFORMAT, "%s: tensor '%s': shape overflows", fname, key);
    t->numel = numel;

    json_t *off = json_object_get(v, "data_offsets");
    json_t *b = json_array_get(off, 0), *e = json_array_get(off, 1);
    if (!json_is_array(off) || json_array_size(off) != 2 || !json_is_integer(b) ||
        !json_is_integer(e) || json_integer_value(b) < 0 || json_integer_value(e) < 0)
        return eng__errf(err, errlen, ENG_EFORMAT,
                         "%s: tensor '%s': field 'data_offsets' must be [begin, end] with non-negative "
                         "integers",
                         fname, key);
    t->begin = (uint64_t)json_integer_value(b);
    t->end = (uint64_t)json_integer_value(e);
    if (t->end < t->begin)
        return eng__errf(err, errlen, ENG_EFORMAT,
                         "%s: tensor '%s': data_offsets [%llu,%llu] end before begin", fname, key,
                         (unsigned long long)t->begin, (unsigned long long)t->end);
    if (t->end - t->begin != numel * esize) {
        char shs[256];
        eng_st_shape_str(t->shape, t->ndim, shs, sizeof shs);
        return eng__errf(err, errlen, ENG_EFORMAT,
                         "%s: tensor '%s': shape %s of %s needs %llu bytes, data_offsets [%llu,%llu] "
                         "span %llu",
                         fname, key, shs, t->dtype_name, (unsigned long long)(numel * esize),
                         (unsigned long long)t->begin, (unsigned long long)t->end,
                         (unsigned long long)(t->end - t->begin));
    }
    t->nbytes = (size_t)(numel * esize);
    return ENG_OK;
}

/* Checks that the tensors tile [0, data_len) exactly: no overlap, no hole,
 * nothing past the end (the reference implementation's rule). */
static int st_check_layout(const char *fname, eng_st_tensor *ts, size_t n, uint64_t data_len,
                           char *err, size_t errlen)
{
    uint64_t max_end = 0;
    for (size_t i = 0; i < n; i++)
        if (ts[i].end > max_end) max_end = ts[i].end;
    if (max_end > data_len)
        return eng__errf(err, errlen, ENG_EFORMAT,
                         "%s: truncated: header says %llu bytes of data, file has %llu", fname,
                         (unsigned long long)max_end, (unsigned long long)data_len);
    if (n == 0) {
        if (data_len != 0)
            return eng__errf(err, errlen, ENG_EFORMAT,
                             "%s: %llu bytes of data follow a header that lists no tensor", fname,
                             (unsigned long long)data_len);
        return ENG_OK;
    }
    const eng_st_tensor **ord = malloc(n * sizeof *ord);
    if (!ord) return eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", fname);
    for (size_t i = 0; i < n; i++) ord[i] = &ts[i];
    qsort(ord, n, sizeof *ord, st_cmp_offset);
    uint64_t pos = 0;
    int rc = ENG_OK;
    for (size_t i = 0; i < n && rc == ENG_OK; i++) {
        const eng_st_tensor *t = ord[i];
        if (t->begin < pos)
            rc = eng__errf(err, errlen, ENG_EFORMAT,
                           "%s: tensor '%s': data_offsets [%llu,%llu] overlap tensor '%s' [%llu,%llu]",
                           fname, t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                           ord[i - 1]->name, (unsigned long long)ord[i - 1]->begin,
                           (unsigned long long)ord[i - 1]->end);
        else if (t->begin > pos)
            rc = eng__errf(err, errlen, ENG_EFORMAT,
                           "%s: tensor '%s': data_offsets [%llu,%llu] leave a hole of %llu bytes "
                           "before it",
                           fname, t->name, (unsigned long long)t->begin, (unsigned long long)t->end,
                           (unsigned long long)(t->begin - pos));
        pos = t->end;
    }
    if (rc == ENG_OK && pos != data_len)
        rc = eng__errf(err, errlen, ENG_EFORMAT,
                       "%s: %llu trailing bytes after the last tensor's data (data section is %llu "
                       "bytes, tensors cover %llu)",
                       fname, (unsigned long long)(data_len - pos), (unsigned long long)data_len,
                       (unsigned long long)pos);
    free(ord);
    return rc;
}

int eng_st_open(const char *path, const char *name, eng_st_file **out, char *err, size_t errlen)
{
    *out = NULL;
    eng_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->name = st_strdup(name))) {
        free(f);
        return eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", name);
    }
    int rc = ENG_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = eng__errf(err, errlen, ENG_EIO, "%s: cannot open '%s': %s", name, path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        rc = eng__errf(err, errlen, ENG_EIO, "%s: '%s' is not a readable regular file", name, path);
        close(fd);
        goto fail;
    }
    if ((uint64_t)st.st_size < 8) {
        close(fd);
        rc = eng__errf(err, errlen, ENG_EFORMAT,
                       "%s: truncated: file has %lld bytes, the header length alone needs 8", name,
                       (long long)st.st_size);
        goto fail;
    }
    if ((uint64_t)st.st_size > (uint64_t)SIZE_MAX) {
        close(fd);
        rc = eng__errf(err, errlen, ENG_EUNSUPPORTED, "%s: file too large to map", name);
        goto fail;
    }
    f->map_len = (size_t)st.st_size;
    void *map = mmap(NULL, f->map_len, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED) {
        rc = eng__errf(err, errlen, ENG_EIO, "%s: cannot map '%s': %s", name, path,
                       strerror(map_errno));
        goto fail;
    }
    f->map = map;
    const unsigned char *p = map;

    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | p[i];
    uint64_t avail = (uint64_t)f->map_len - 8;
    if (hlen > ENG_ST_MAX_HEADER) {
        rc = eng__errf(err, errlen, ENG_EFORMAT,
                       "%s: header length %llu exceeds the limit of %u bytes", name,
                       (unsigned long long)hlen, ENG_ST_MAX_HEADER);
        goto fail;
    }
    if (hlen > avail) {
        rc = eng__errf(err, errlen, ENG_EFORMAT,
                       "%s: truncated: header length is %llu bytes, file has %llu after the length",
                       name, (unsigned long long)hlen, (unsigned long long)avail);
        goto fail;
    }
    json_error_t jerr;
    /* Duplicate names are refused: the reference implementation does too and
     * the second entry would silently shadow the first. */
    f->header = json_loadb((const char *)p + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!f->header) {
        rc = eng__errf(err, errlen, ENG_EFORMAT, "%s: header is not valid JSON: %s (byte %d)", name,
                       jerr.text, jerr.position);
        goto fail;
    }
    if (!json_is_object(f->header)) {
        rc = eng__errf(err, errlen, ENG_EFORMAT, "%s: header must be a JSON object", name);
        goto fail;
    }

    size_t cap = json_object_size(f->header);
    f->tensors = calloc(cap ? cap : 1, sizeof *f->tensors);
    if (!f->tensors) {
        rc = eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", name);
        goto fail;
    }
    const char *key;
    json_t *v;
    json_object_foreach(f->header, key, v) {
        if (strcmp(key, "__metadata__") == 0) continue;
        eng_st_tensor *t = &f->tensors[f->n_tensors];
        rc = st_parse_tensor(name, key, v, t, err, errlen);
        if (rc != ENG_OK) goto fail;
        t->file = f;
        f->n_tensors++;
    }
    uint64_t data_len = avail - hlen;
    rc = st_check_layout(name, f->tensors, f->n_tensors, data_len, err, errlen);
    if (rc != ENG_OK) goto fail;
    const unsigned char *data = p + 8 + hlen;
    for (size_t i = 0; i < f->n_tensors; i++) f->tensors[i].data = data + f->tensors[i].begin;
    qsort(f->tensors, f->n_tensors, sizeof *f->tensors, st_cmp_name);
    *out = f;
    return ENG_OK;

fail:
    eng_st_close(f);
    return rc;
}

const eng_st_tensor *eng_st_file_find(const eng_st_file *f, const char *name)
{
    eng_st_tensor key;
    memset(&key, 0, sizeof key);
    key.name = name;
    return bsearch(&key, f->tensors, f->n_tensors, sizeof *f->tensors, st_cmp_name);
}

/* ---- a model directory's checkpoint ------------------------------------- */

static int st_cmp_ptr_name(const void *a, const void *b)
{
    const eng_st_tensor *x = *(const eng_st_tensor *const *)a;
    const eng_st_tensor *y = *(const eng_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

void eng_st_set_close(eng_st_set *s)
{
    if (!s) return;
    for (size_t i = 0; i < s->n_files; i++) eng_st_close(s->files[i]);
    free(s->files);
    free((void *)s->tensors);
    free(s->where);
    free(s);
}

#define ST_SINGLE "model.safetensors"
#define ST_INDEX "model.safetensors.index.json"
#define ST_MAX_INDEX (64u * 1024u * 1024u)

static int st_set_single(const char *dir, eng_st_set *s, char *err, size_t errlen)
{
    char *path = st_join(dir, ST_SINGLE);
    s->files = calloc(1, sizeof *s->files);
    if (!path || !s->files) {
        free(path);
        return eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", ST_SINGLE);
    }
    int rc = eng_st_open(path, ST_SINGLE, &s->files[0], err, errlen);
    free(path);
    if (rc != ENG_OK) return rc;
    s->n_files = 1;
    eng_st_file *f = s->files[0];
    s->tensors = malloc((f->n_tensors ? f->n_tensors : 1) * sizeof *s->tensors);
    if (!s->tensors) return eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", ST_SINGLE);
    for (size_t i = 0; i < f->n_tensors; i++) s->tensors[i] = &f->tensors[i];
    s->n_tensors = f->n_tensors; /* already sorted by name */
    return ENG_OK;
}

static int st_set_sharded(const char *dir, eng_st_set *s, char *err, size_t errlen)
{
    char *path = st_join(dir, ST_INDEX);
    if (!path) return eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", ST_INDEX);
    char *buf = NULL;
    size_t len = 0;
    int rc = eng_st_read_file(path, ST_INDEX, ST_MAX_INDEX, &buf, &len, err, errlen);
    free(path);
    if (rc != ENG_OK) return rc;
    json_error_t jerr;
    json_t *root = json_loadb(buf, len, 0, &jerr);
    free(buf);
    if (!root)
        return eng__errf(err, errlen, ENG_EFORMAT, "%s: invalid JSON at line %d column %d: %s",
                         ST_INDEX, jerr.line, jerr.column, jerr.text);
    json_t *wm = json_object_get(root, "weight_map");
    const char *key;
    json_t *v;
    if (!json_is_object(wm)) {
        rc = eng__errf(err, errlen, ENG_EFORMAT, "%s: field 'weight_map' must be an object", ST_INDEX);
        goto done;
    }
    size_t n = json_object_size(wm);
    s->files = calloc(n ? n : 1, sizeof *s->files);
    s->tensors = malloc((n ? n : 1) * sizeof *s->tensors);
    if (!s->files || !s->tensors) {
        rc = eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", ST_INDEX);
        goto done;
    }
    json_object_foreach(wm, key, v) {
        if (!json_is_string(v)) {
            rc = eng__errf(err, errlen, ENG_EFORMAT,
                           "%s: field 'weight_map[\"%s\"]' must be a file name string", ST_INDEX, key);
            goto done;
        }
        const char *shard = json_string_value(v);
        /* Shards live in the model directory itself: no paths. */
        if (!shard[0] || strchr(shard, '/') || strcmp(shard, ".") == 0 || strcmp(shard, "..") == 0) {
            rc = eng__errf(err, errlen, ENG_EFORMAT,
                           "%s: field 'weight_map[\"%s\"]' names '%s', which is not a plain file name",
                           ST_INDEX, key, shard);
            goto done;
        }
        eng_st_file *f = NULL;
        for (size_t i = 0; i < s->n_files && !f; i++)
            if (strcmp(s->files[i]->name, shard) == 0) f = s->files[i];
        if (!f) {
            char *sp = st_join(dir, shard);
            if (!sp) {
                rc = eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", ST_INDEX);
                goto done;
            }
            if (!st_exists(sp)) {
                rc = eng__errf(err, errlen, ENG_EIO,
                               "%s: shard '%s' (holding tensor '%s') does not exist in '%s'", ST_INDEX,
                               shard, key, dir);
                free(sp);
                goto done;
            }
            rc = eng_st_open(sp, shard, &f, err, errlen);
            free(sp);
            if (rc != ENG_OK) goto done;
            s->files[s->n_files++] = f;
        }
        const eng_st_tensor *t = eng_st_file_find(f, key);
        if (!t) {
            rc = eng__errf(err, errlen, ENG_EFORMAT,
                           "%s: tensor '%s' is mapped to '%s', which does not contain it", ST_INDEX,
                           key, shard);
            goto done;
        }
        /* Names in `t` are owned by the shard's header, which outlives this
         * index's JSON. */
        s->tensors[s->n_tensors++] = t;
    }
    qsort((void *)s->tensors, s->n_tensors, sizeof *s->tensors, st_cmp_ptr_name);
done:
    json_decref(root);
    return rc;
}

int eng_st_set_open(const char *dir, eng_st_set **out, char *err, size_t errlen)
{
    *out = NULL;
    eng_st_set *s = calloc(1, sizeof *s);
    if (!s) return eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", ST_SINGLE);
    char *single = st_join(dir, ST_SINGLE), *index = st_join(dir, ST_INDEX);
    int rc;
    if (!single || !index) {
        rc = eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", ST_SINGLE);
    } else if (st_exists(single)) {
        /* transformers prefers the single file when both exist. */
        s->where = st_strdup(ST_SINGLE);
        rc = s->where ? st_set_single(dir, s, err, errlen)
                      : eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", ST_SINGLE);
    } else if (st_exists(index)) {
        s->where = st_strdup(ST_INDEX);
        rc = s->where ? st_set_sharded(dir, s, err, errlen)
                      : eng__errf(err, errlen, ENG_ENOMEM, "%s: out of memory", ST_INDEX);
    } else {
        rc = eng__errf(err, errlen, ENG_EIO, "%s: neither %s nor %s found", dir, ST_SINGLE, ST_INDEX);
    }
    free(single);
    free(index);
    if (rc != ENG_OK) {
        eng_st_set_close(s);
        return rc;
    }
    *out = s;
    return ENG_OK;
}

const eng_st_tensor *eng_st_set_find(const eng_st_set *s, const char *name)
{
    eng_st_tensor key;
    memset(&key, 0, sizeof key);
    key.name = name;
    const eng_st_tensor *kp = &key;
    const eng_st_tensor *const *r =
        bsearch(&kp, s->tensors, s->n_tensors, sizeof *s->tensors, st_cmp_ptr_name);
    return r ? *r : NULL;
}
