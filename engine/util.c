/* util.c — status strings, error formatting and hashing shared by the engine. */
#include <stdio.h>

#include "internal.h"

const char *eng_strerror(int status)
{
    switch (status) {
    case ENG_OK: return "ok";
    case ENG_EINVAL: return "invalid argument";
    case ENG_ENOMEM: return "out of memory";
    case ENG_EIO: return "I/O error";
    case ENG_EFORMAT: return "malformed input";
    case ENG_EUNSUPPORTED: return "unsupported";
    case ENG_ENOSPC: return "no free K/V block or sequence slot";
    case ENG_ERANGE: return "limit exceeded";
    case ENG_EMISMATCH: return "state does not match this model or engine";
    case ENG_EDEVICE: return "device error (the engine is unusable)";
    default: return "unknown error";
    }
}

int eng__errf(char *err, size_t errlen, int status, const char *fmt, ...)
{
    if (err && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return status;
}

uint64_t eng__fnv1a64(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}
