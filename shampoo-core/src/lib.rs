//! Shampoo core (work in progress).
