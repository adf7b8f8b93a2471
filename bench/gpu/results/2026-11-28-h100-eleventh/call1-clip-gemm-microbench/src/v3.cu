#include "cfg.cuh"
DEF(v3q, QuickGelu, 128, 96, true)
DEF(v3i, Ident, 128, 96, true)
