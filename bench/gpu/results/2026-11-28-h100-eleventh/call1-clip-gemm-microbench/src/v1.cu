#include "cfg.cuh"
DEF(v1q, QuickGelu, 128, 128, false)
DEF(v1i, Ident, 128, 128, false)
