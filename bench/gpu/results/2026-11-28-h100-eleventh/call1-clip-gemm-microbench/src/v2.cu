#include "cfg.cuh"
DEF(v2q, QuickGelu, 128, 64, true)
DEF(v2i, Ident, 128, 64, true)
