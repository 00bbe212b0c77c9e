//! # train — training Llama models with MIL kernels on a device
//!
//! The matmul-heavy work of every layer — projections, attention, the FFN, and all their
//! input gradients — is generated here as MIL programs ([`kernels`]) and run on a
//! [`device::Device`]; everything else runs on the CPU ([`cpu_ops`], [`optim`]). The
//! same code drives the CPU device on any machine and the ANE on a Mac.
//!
//! Layers, bottom up: kernel generators ([`kernels`]) → the device model
//! ([`model`]: forward and decoding on a device) → pipelines (training steps) →
//! checkpoints, telemetry and the efficiency report.

pub mod bpe;
pub mod checkpoint;
pub mod corpus;
pub mod cpu_ops;
pub mod data;
pub mod kernels;
pub mod linalg;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod telemetry;
pub mod trainer;
