//! Buffers are planned at compile time: in the steady state an eval allocates nothing.
//!
//! A counting global allocator (this test binary only) counts heap allocations made on
//! the evaluating thread. The program covers every non-GEMM kind of step — fp16 input
//! conversion, elementwise with broadcasting, a strided copy, softmax, both reduction
//! loop orders, concat, gather, fp16 and fp32 outputs — at sizes that stay on the
//! calling thread (one thread). GEMM steps are left out: the `gemm` crate allocates its
//! own packing buffers per call, which is not the device's planning.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use device::cpu::CpuDevice;
use device::{Device, Precision, Surface, Weights};
use mil::builder::FunctionBuilder;
use mil::{DType, Dialect, Program, TensorType, Value};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn steady_state_evals_allocate_nothing() {
    for precision in [Precision::Fp32, Precision::Fp16] {
        let mut b = FunctionBuilder::new("main", Dialect::Ios18);
        let x = b.input("x", TensorType::surface(DType::Fp16, 16, 24));
        let g = b.input("g", TensorType::new(DType::Fp32, [16, 1]));
        let x32 = b.cast("x32", &x, DType::Fp32);
        let g4 = b.reshape("g4", &g, &[1, 16, 1, 1]);
        let scaled = b.mul("scaled", &x32, &g4); // broadcast per channel
        let act = b.silu("act", &scaled);
        let t = b.transpose("t", &act, &[0, 3, 2, 1]); // [1, 24, 1, 16], strided
        let tc = b.reshape("tc", &t, &[24, 16]); // needs a copy
        let sm = b.softmax("sm", &tc, -1);
        let mean = b.reduce_mean("mean", &act, &[1], true); // kept axis innermost
        let rows = b.reduce_max("rows", &tc, &[1], false); // reduced axis innermost
        let cat = b.concat("cat", &[&act, &act], 1);
        let idx = b.constant("idx", Value::int32s(&[3, 0, 23]));
        let picked = b.gather("picked", &sm, &idx, 0);
        let out16 = b.cast("out16", &picked, DType::Fp16);
        b.output(&out16);
        b.output(&mean);
        b.output(&rows);
        b.output(&cat);
        let program = Program::new(Dialect::Ios18, b.finish().unwrap());
        let mut kernel = CpuDevice::new(precision).with_threads(1).compile(&program, &Weights::new()).unwrap();

        let x = Surface::from_f32(
            DType::Fp16,
            &[1, 16, 1, 24],
            &(0..384).map(|i| (i % 13) as f32 * 0.1).collect::<Vec<_>>(),
        );
        let g = Surface::from_f32(DType::Fp32, &[16, 1], &(0..16).map(|i| 1.0 - i as f32 * 0.05).collect::<Vec<_>>());
        let mut out16 = Surface::zeros(DType::Fp16, &[3, 16]);
        let mut mean = Surface::zeros(DType::Fp32, &[1, 1, 1, 24]);
        let mut rows = Surface::zeros(DType::Fp32, &[24]);
        let mut cat = Surface::zeros(DType::Fp32, &[1, 32, 1, 24]);

        kernel.eval(&[&x, &g], &mut [&mut out16, &mut mean, &mut rows, &mut cat]).unwrap();
        let first = out16.to_f32();
        let before = allocations();
        for _ in 0..5 {
            kernel.eval(&[&x, &g], &mut [&mut out16, &mut mean, &mut rows, &mut cat]).unwrap();
        }
        let during = allocations() - before;
        assert_eq!(during, 0, "{precision:?}: {during} heap allocations in 5 evals");
        // The counter works (this allocates) and the evals computed something.
        let again = out16.to_f32();
        assert!(allocations() > before);
        assert_eq!(first, again);
        assert!(again.iter().all(|v| v.is_finite() && *v > 0.0));
    }
}
