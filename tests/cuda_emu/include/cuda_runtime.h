// CUDA runtime API of the CPU emulation used by the tests (see qm_cuda_emu.h).
#pragma once
#include "qm_cuda_emu.h"
