#pragma once
// Runtime dtype -> template parameter (the BOOL_SWITCH idea of flash-attention's static_switch.h).
#include <string>

#include "common/checks.h"

// Runs the lambda-like body with `scalar_t` bound to float or double, according to the dtype of `arr`.
#define VITX_DISPATCH_FLOAT(OP, NAME, arr, ...)                                                              \
  [&] {                                                                                                       \
    if (::vitx::has_dtype<float>(arr)) {                                                                      \
      using scalar_t = float;                                                                                 \
      return __VA_ARGS__();                                                                                   \
    } else if (::vitx::has_dtype<double>(arr)) {                                                              \
      using scalar_t = double;                                                                                \
      return __VA_ARGS__();                                                                                   \
    }                                                                                                         \
    throw std::invalid_argument(std::string(OP) + ": " + NAME + " must be float32 or float64, got " +       \
                                ::vitx::dtype_str(arr));                                                      \
  }()
