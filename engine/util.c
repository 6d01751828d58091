/* util.c — status strings, error formatting, hashing and splitmix64 shared by the engine
 * (splitmix64 also by the server). */
#include <stdio.h>
#include <string.h>

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

uint64_t eng_splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

int eng__errf(char *err, size_t errlen, int status, const char *fmt, ...)
{
    if (err && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n >= errlen) {
            /* cut: never leave half a UTF-8 character at the end (messages
             * go into JSON, which must be valid UTF-8) */
            size_t len = strlen(err), j = len;
            while (j > 0 && ((unsigned char)err[j - 1] & 0xC0) == 0x80) j--;
            if (j > 0) {
                unsigned char lead = (unsigned char)err[j - 1];
                size_t need = lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : (lead >> 3) == 30 ? 4 : 1;
                if (j - 1 + need > len) err[j - 1] = 0;
            }
        }
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
