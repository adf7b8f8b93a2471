#include "cfg.cuh"
DEF(v4q, QuickGelu, 128, 128, true)
DEF(v4i, Ident, 128, 128, true)
