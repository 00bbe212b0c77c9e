//! Llama forward and decoding on a device. (Being written.)
