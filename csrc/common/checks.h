#pragma once
#include <stdexcept>
#include <string>

// Readable validation at the binding boundary: "op: what is wrong".
#define VITX_CHECK(cond, msg)                                   \
  do {                                                          \
    if (!(cond)) throw std::invalid_argument(std::string(msg)); \
  } while (0)
