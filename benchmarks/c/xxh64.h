/* The product's XXH64 (overlay/xxh64.h, also compiled into overlay/_fastio.c): one implementation. */
#include "../../overlay/xxh64.h"
