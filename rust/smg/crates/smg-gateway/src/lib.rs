//! smg-gateway library: router, forwarding, limits.
