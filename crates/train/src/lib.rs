//! # train — training Llama models with MIL kernels on a device
//!
//! The matmul-heavy work of every layer — projections, attention, the FFN, and all their
//! input gradients — is generated here as MIL programs ([`kernels`]) and run on a
//! [`device::Device`]; everything else runs on the CPU ([`cpu_ops`], [`optim`]). The
//! same code drives the CPU device on any machine and the ANE on a Mac.
//!
//! Layers, bottom up: kernel generators ([`kernels`]) → the device model
//! ([`model`]: forward and decoding on a device) → pipelines (training steps: dynamic
//! [`pipeline`], [`static_pipeline`] with [`static_kernels`], [`double_buffer`], one
//! [`pipelines::Pipeline`] for all three) →
//! checkpoints, telemetry and the efficiency report. [`cost_model`] predicts a step's time
//! on an ANE from the same kernel programs and schedules, for machines without one.

pub mod binding;
pub mod bpe;
pub mod chat_data;
pub mod checkpoint;
pub mod corpus;
pub mod cost_model;
pub mod cpu_ops;
pub mod data;
pub mod distributed;
pub mod double_buffer;
pub mod download;
pub mod kernels;
pub mod linalg;
pub mod lora;
pub mod lora_kernels;
pub mod lora_pipeline;
pub mod lora_trainer;
pub mod model;
pub mod optim;
pub mod peft;
pub mod pipeline;
pub mod pipelines;
pub mod pretokenize;
pub mod static_kernels;
pub mod static_pipeline;
pub mod telemetry;
pub mod trainer;
