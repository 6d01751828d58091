/*
 * safetensors.h — private reader for Hugging Face safetensors checkpoints
 * (prefix eng_st_).  Used by model.c only.
 *
 * A file is memory-mapped read-only; its header (u64 little-endian length N,
 * then N bytes of JSON) is parsed and every tensor's dtype, shape and
 * data_offsets are checked against the file before anything is handed out, so
 * a tensor's `data` always lies inside the mapping and holds exactly
 * numel * element-size bytes.  The layout rules are those of the reference
 * implementation (the `safetensors` crate): offsets relative to the end of the
 * header, tensors may not overlap, and together they must cover the data
 * section exactly (no holes, no trailing bytes).
 *
 * A set is the checkpoint of one model directory: either
 * `model.safetensors`, or the shards named by `model.safetensors.index.json`
 * (each shard opened once).  Every error fills (err, errlen) with one line
 * that starts with the file at fault.
 */
#ifndef MKAD_ENGINE_SAFETENSORS_H
#define MKAD_ENGINE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define ENG_ST_MAX_DIMS 8
/* Largest header accepted (bytes of JSON). */
#define ENG_ST_MAX_HEADER (100u * 1024u * 1024u)

/* Element types the engine converts.  Other safetensors dtypes are parsed
 * (their layout is checked) as ENG_ST_OTHER; model.c refuses them only when
 * the model needs that tensor. */
enum { ENG_ST_F32 = 0, ENG_ST_F16 = 1, ENG_ST_BF16 = 2, ENG_ST_OTHER = 3 };

struct json_t;
struct eng_st_file;

typedef struct eng_st_tensor {
    const char *name;       /* borrowed from the header JSON; valid until the file is closed */
    const char *dtype_name; /* as written in the header, e.g. "BF16" */
    int dtype;              /* ENG_ST_F32 / F16 / BF16, or ENG_ST_OTHER */
    int ndim;
    int64_t shape[ENG_ST_MAX_DIMS];
    uint64_t numel;
    uint64_t begin, end;             /* data_offsets, relative to the data section */
    const unsigned char *data;       /* (nbytes) inside the mapping */
    size_t nbytes;
    const struct eng_st_file *file;  /* the file holding it */
} eng_st_tensor;

typedef struct eng_st_file {
    char *name;              /* base name, for messages */
    void *map;               /* read-only mapping of the whole file */
    size_t map_len;
    struct json_t *header;   /* parsed header; owns the tensor names */
    eng_st_tensor *tensors;  /* (n_tensors), sorted by name */
    size_t n_tensors;
} eng_st_file;

typedef struct eng_st_set {
    char *where;                   /* file that lists the tensors: "model.safetensors" or
                                      "model.safetensors.index.json" */
    eng_st_file **files;           /* (n_files) */
    size_t n_files;
    const eng_st_tensor **tensors; /* (n_tensors) every tensor of the checkpoint, sorted by name */
    size_t n_tensors;
} eng_st_set;

/* Reads the whole file `path` into a malloc'ed buffer (caller frees; one
 * extra NUL byte is appended).  `name` is used in messages.  Refuses files
 * larger than max_len.  ENG_EIO when it cannot be opened or read. */
int eng_st_read_file(const char *path, const char *name, size_t max_len, char **buf,
                     size_t *len, char *err, size_t errlen);

/* Maps and validates one safetensors file.  `name` (copied) names it in
 * messages.  On success *out is owned by the caller: eng_st_close. */
int eng_st_open(const char *path, const char *name, eng_st_file **out, char *err,
                size_t errlen);
void eng_st_close(eng_st_file *f);
/* Borrowed; NULL when the file has no tensor of that name. */
const eng_st_tensor *eng_st_file_find(const eng_st_file *f, const char *name);

/* Opens the checkpoint of the model directory `dir`: model.safetensors when it
 * exists (as transformers does), else the shards listed by
 * model.safetensors.index.json.  ENG_EIO naming both when neither exists.
 * On success *out is owned by the caller: eng_st_set_close. */
int eng_st_set_open(const char *dir, eng_st_set **out, char *err, size_t errlen);
void eng_st_set_close(eng_st_set *s);
/* Borrowed; NULL when the checkpoint has no tensor of that name. */
const eng_st_tensor *eng_st_set_find(const eng_st_set *s, const char *name);

/* Element conversions to f32.  f16 is exact IEEE binary16 (subnormals,
 * infinities and NaN payloads included); bf16 is the upper half of an f32. */
float eng_st_f16_to_f32(uint16_t h);
float eng_st_bf16_to_f32(uint16_t b);
/* Converts all numel elements of t (F32, F16 or BF16) into dst (numel). */
void eng_st_to_f32(const eng_st_tensor *t, float *dst);
/* Copies a BF16 tensor's raw values (numel, host order). */
void eng_st_to_bf16(const eng_st_tensor *t, uint16_t *dst);
/* "f32", "f16", "bf16" for the convertible dtypes, else "other". */
const char *eng_st_dtype_lower(int dtype);

/* Writes "[a,b,...]" for a shape into buf (always NUL-terminated). */
void eng_st_shape_str(const int64_t *shape, int ndim, char *buf, size_t len);

#endif /* MKAD_ENGINE_SAFETENSORS_H */
