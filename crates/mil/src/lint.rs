//! The ANE lint. (Being written.)
