"""Weight rounding beyond round-to-nearest (Hessian-compensated rounding)."""
