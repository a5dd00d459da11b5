//! Documentation (work in progress).
