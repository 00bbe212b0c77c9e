//! Data-parallel training across processes: every rank holds the whole model, computes
//! the gradients of its share of each step's micro-batches, and the ranks sum them
//! before the one optimizer step they all apply. The transport is MPI (the `mpi` crate,
//! behind the cargo feature `mpi`, over Open MPI or MPICH): anetrain grows no networking.
//!
//! The trainer sees a [`Collective`] (a handful of collectives, with a single-process
//! implementation that is always compiled, [`Solo`]) wrapped in a [`Distributed`], which
//! owns what data parallelism adds to a step:
//! - which micro-batches this rank computes ([`Distributed::owns`]): of the `G` global
//!   micro-batches of a step, rank `r` of `N` takes `r, r + N, …`. The data order is the
//!   single-process one (one seeded window stream, [`crate::data::Sampler`]): every rank
//!   draws all `G` micro-batches' windows in order and fills only its own, so the stream's
//!   position after a step is the same on every rank and in the checkpoint, whatever `N`;
//! - the sum of the gradients over ranks. Each micro-batch's backward is seeded with
//!   `S / G` (loss scale over global micro-batches), so the sum *is* the mean gradient,
//!   as a single process accumulating `G` micro-batches computes it;
//! - the optimizer step: global-norm clipping on the summed gradients, and with
//!   `--shard-optimizer` ZeRO-1 ([`Distributed::with_sharded_optimizer`]).
//!
//! Exactness: the summands are the same as a single process's, only the order of the
//! additions differs (`(g0 + g2) + (g1 + g3)` instead of `((g0 + g1) + g2) + g3`), so
//! losses and weights agree to rounding (the CI test bounds it by 1e-6 relative).
//!
//! Overlap: the pipelines' `forward_backward` returns after the whole backward of a
//! micro-batch ([`crate::pipelines::Passes`]); no layer's gradients are announced before
//! that, and with accumulation they are final only after the last micro-batch's
//! backward. So the all-reduce runs after the backward, in buckets of [`BUCKET`] values
//! (bounded scratch memory), and its time is measured ([`CommStats`]); none of it is hidden.

use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use crate::optim::{self, AdamW, LossScaler, StepOutcome};

/// Values per all-reduce call: bounds the scratch copy (rsmpi's all-reduce needs a send
/// buffer apart from the receive buffer) to 16 MiB.
pub const BUCKET: usize = 4 << 20;

/// The collectives data parallelism needs. Every rank calls them in the same order.
pub trait Collective {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// What carries the messages (`single process`, `MPI (Open MPI v4.1.4)`).
    fn backend(&self) -> String;
    /// Replaces `buf` by its element-wise sum over all ranks; every rank gets the same bits.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// [`Collective::all_reduce_sum`] for f64 (losses, squared norms).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
    /// Sums `send` (the whole vector) over ranks; this rank receives the sum of its shard
    /// `send[shards[rank]]` into `recv`. `shards` partition `0..send.len()` in rank order.
    fn reduce_scatter_sum(&self, send: &[f32], shards: &[Range<usize>], recv: &mut [f32]);
    /// Each rank contributes its shard `send`; `buf[shards[r]]` receives rank `r`'s.
    fn all_gather(&self, send: &[f32], shards: &[Range<usize>], buf: &mut [f32]);
    /// Waits until every rank has called it.
    fn barrier(&self);

    /// The element-wise mean over ranks (a sum, then a division by the rank count).
    fn all_reduce_mean(&self, buf: &mut [f32]) {
        self.all_reduce_sum(buf);
        let n = self.size() as f32;
        buf.iter_mut().for_each(|v| *v /= n);
    }
}

/// One process: every collective is the identity.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn backend(&self) -> String {
        "single process".into()
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) {}
    fn reduce_scatter_sum(&self, send: &[f32], shards: &[Range<usize>], recv: &mut [f32]) {
        recv.copy_from_slice(&send[shards[0].clone()]);
    }
    fn all_gather(&self, send: &[f32], shards: &[Range<usize>], buf: &mut [f32]) {
        buf[shards[0].clone()].copy_from_slice(send);
    }
    fn barrier(&self) {}
}

/// Rank and size as the launcher (mpirun / mpiexec) announces them in the environment:
/// Open MPI's `OMPI_COMM_WORLD_*`, MPICH/Hydra's `PMI_*`, PMIx's `PMIX_RANK` (size
/// unknown there). `None` when not launched by an MPI launcher.
pub fn launcher_ranks() -> Option<(usize, Option<usize>)> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    if let Some(rank) = var("OMPI_COMM_WORLD_RANK") {
        return Some((rank, var("OMPI_COMM_WORLD_SIZE")));
    }
    if let Some(rank) = var("PMI_RANK") {
        return Some((rank, var("PMI_SIZE")));
    }
    var("PMIX_RANK").map(|rank| (rank, None))
}

/// The collective for this process: MPI when built with the `mpi` feature and launched
/// by an MPI launcher, else [`Solo`] (so a plain `anetrain train` never initialises MPI).
/// Launched by mpirun with several ranks but built without the feature, every rank would
/// train alone on the same data: that is refused, naming the fix.
pub fn init() -> Result<Rc<dyn Collective>, String> {
    let Some((_, size)) = launcher_ranks() else { return Ok(Rc::new(Solo)) };
    #[cfg(feature = "mpi")]
    {
        let _ = size;
        mpi_backend::Mpi::init().map(|m| Rc::new(m) as Rc<dyn Collective>)
    }
    #[cfg(not(feature = "mpi"))]
    match size {
        Some(n) if n > 1 => Err(format!(
            "launched by mpirun with {n} ranks, but this anetrain was built without MPI: each rank would train \
             alone. Rebuild with `cargo build --release --features mpi` (needs an MPI library, e.g. Open MPI)"
        )),
        _ => Ok(Rc::new(Solo)),
    }
}

/// Ends every rank of the job at once after an error on this one (MPI_Abort), so the
/// others do not wait forever in a collective; a no-op without MPI.
pub fn abort_job(code: i32) {
    #[cfg(feature = "mpi")]
    mpi_backend::abort(code);
    #[cfg(not(feature = "mpi"))]
    let _ = code;
}

/// Time and traffic in collectives, summed over the steps of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    /// Seconds in gradient/parameter collectives (all-reduce, reduce-scatter, all-gather).
    pub seconds: f64,
    /// Bytes this rank sent, as the bandwidth-optimal (ring) algorithms send them:
    /// `2·(N−1)/N·B` for an all-reduce of `B` bytes, `(N−1)/N·B` for a reduce-scatter
    /// or an all-gather. (MPI picks its own algorithm; this is the payload a link must carry.)
    pub bytes_sent: f64,
    /// Steps counted.
    pub steps: u64,
}

/// ZeRO-1 state: this rank's contiguous shard of the parameters, its AdamW moments, and
/// the reduced gradients and parameters of the shard.
struct Zero {
    /// The shards of all ranks, in rank order: a partition of `0..n_params`.
    shards: Vec<Range<usize>>,
    adam: AdamW,
    grad: Vec<f32>,
    param: Vec<f32>,
}

/// A [`Collective`] and what data parallelism keeps between steps.
pub struct Distributed {
    comm: Rc<dyn Collective>,
    shard_requested: bool,
    zero: Option<Zero>,
    stats: CommStats,
}

impl Default for Distributed {
    fn default() -> Distributed {
        Distributed::new(Rc::new(Solo))
    }
}

impl Distributed {
    pub fn new(comm: Rc<dyn Collective>) -> Distributed {
        Distributed { comm, shard_requested: false, zero: None, stats: CommStats::default() }
    }

    /// Asks for ZeRO-1: each rank keeps AdamW state for `1/N` of the parameters (set up
    /// when the trainer adopts this, [`crate::trainer::Trainer::distribute`]).
    pub fn with_sharded_optimizer(mut self, shard: bool) -> Distributed {
        self.shard_requested = shard;
        self
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn size(&self) -> usize {
        self.comm.size()
    }
    /// Rank 0 writes checkpoints, telemetry, the progress bar and samples.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }
    pub fn backend(&self) -> String {
        self.comm.backend()
    }
    pub fn comm(&self) -> &dyn Collective {
        self.comm.as_ref()
    }
    pub fn stats(&self) -> CommStats {
        self.stats
    }
    /// True when the optimizer state is sharded (ZeRO-1).
    pub fn sharded(&self) -> bool {
        self.zero.is_some()
    }

    /// Bytes of AdamW state (first and second moments) this rank holds.
    pub fn optimizer_bytes(&self, adam: &AdamW) -> usize {
        match &self.zero {
            Some(z) => (z.adam.m.len() + z.adam.v.len()) * 4,
            None => (adam.m.len() + adam.v.len()) * 4,
        }
    }

    /// [`Distributed::optimizer_bytes`] of a trainer's optimizer.
    pub fn optimizer_bytes_of(&self, trainer: &crate::trainer::Trainer<'_>) -> usize {
        self.optimizer_bytes(trainer.optimizer())
    }

    /// True when global micro-batch `index` of a step is this rank's: `r, r + N, …`.
    pub fn owns(&self, index: usize) -> bool {
        index % self.size() == self.rank()
    }

    /// Checks that `global_accum` micro-batches split evenly over the ranks; the error
    /// names the flags.
    pub fn check_accum(&self, global_accum: usize) -> Result<(), String> {
        let n = self.size();
        if !global_accum.is_multiple_of(n) {
            return Err(format!(
                "--resume: the checkpoint's run accumulates {global_accum} micro-batches per optimizer step (--accum × \
                 ranks), which {n} ranks cannot share evenly; resume on a number of ranks that divides {global_accum}"
            ));
        }
        Ok(())
    }

    /// Shards `adam` (the full state) for ZeRO-1 if asked: this rank keeps its shard
    /// and `adam` keeps only its step count and configuration.
    pub(crate) fn adopt(&mut self, adam: &mut AdamW) -> Result<(), String> {
        if !self.shard_requested || self.zero.is_some() {
            return Ok(());
        }
        let (n, ranks) = (adam.n_params(), self.size());
        let per = n.div_ceil(ranks);
        let shards: Vec<Range<usize>> = (0..ranks).map(|r| (r * per).min(n)..((r + 1) * per).min(n)).collect();
        let mine = shards[self.rank()].clone();
        let decayed: Vec<Range<usize>> = adam
            .decayed()
            .iter()
            .filter_map(|d| {
                let (s, e) = (d.start.max(mine.start), d.end.min(mine.end));
                (s < e).then(|| s - mine.start..e - mine.start)
            })
            .collect();
        let mut shard = AdamW::new(adam.config, mine.len(), decayed).map_err(|e| e.to_string())?;
        shard.m.copy_from_slice(&adam.m[mine.clone()]);
        shard.v.copy_from_slice(&adam.v[mine.clone()]);
        shard.step = adam.step;
        // The full moments go: this rank's memory holds 1/N of them from now on.
        adam.m = Vec::new();
        adam.v = Vec::new();
        self.zero = Some(Zero { shards, adam: shard, grad: vec![0.0; mine.len()], param: vec![0.0; mine.len()] });
        Ok(())
    }

    /// The full AdamW moments for a checkpoint (gathered from the shards under ZeRO-1:
    /// a collective, so every rank calls it).
    pub(crate) fn full_moments(&self, adam: &AdamW, n_params: usize) -> (Vec<f32>, Vec<f32>) {
        match &self.zero {
            None => (adam.m.clone(), adam.v.clone()),
            Some(z) => {
                let (mut m, mut v) = (vec![0.0; n_params], vec![0.0; n_params]);
                self.comm.all_gather(&z.adam.m, &z.shards, &mut m);
                self.comm.all_gather(&z.adam.v, &z.shards, &mut v);
                (m, v)
            }
        }
    }

    /// The sum over ranks of this rank's loss sum.
    pub(crate) fn sum_loss(&self, local: f64) -> f64 {
        let mut buf = [local];
        self.comm.all_reduce_sum_f64(&mut buf);
        buf[0]
    }

    /// One optimizer step on this rank's accumulated gradients (seeded with `S / G`, so
    /// their sum over ranks is `S ×` the mean gradient): sums them over the ranks, clips
    /// by the global norm and updates — the whole state, or with ZeRO-1 this rank's
    /// shard followed by an all-gather of the parameters. With one rank, exactly
    /// [`optim::step_with_scaling`].
    pub(crate) fn optimizer_step(
        &mut self,
        adam: &mut AdamW,
        scaler: &mut LossScaler,
        params: &mut [f32],
        grads: &mut [f32],
        lr: f32,
        clip: f32,
    ) -> StepOutcome {
        let ranks = self.size();
        if ranks == 1 && self.zero.is_none() {
            return optim::step_with_scaling(adam, scaler, params, grads, lr, clip);
        }
        let bytes = (grads.len() * 4) as f64;
        let share = (ranks - 1) as f64 / ranks as f64;
        let start = Instant::now();
        let outcome = match &mut self.zero {
            None => {
                self.comm.all_reduce_sum(grads);
                self.stats.seconds += start.elapsed().as_secs_f64();
                self.stats.bytes_sent += 2.0 * share * bytes;
                optim::step_with_scaling(adam, scaler, params, grads, lr, clip)
            }
            Some(z) => {
                let mine = z.shards[self.comm.rank()].clone();
                self.comm.reduce_scatter_sum(grads, &z.shards, &mut z.grad);
                let mut comm_seconds = start.elapsed().as_secs_f64();
                // ‖g‖ over all ranks' shards: each rank's squared norm, summed.
                let local = f64::from(optim::grad_norm(&z.grad));
                let mut sum_sq = [local * local];
                let t = Instant::now();
                self.comm.all_reduce_sum_f64(&mut sum_sq);
                comm_seconds += t.elapsed().as_secs_f64();
                let scale = scaler.scale;
                let norm = (sum_sq[0].sqrt() as f32) / scale;
                let applied = scaler.update(norm.is_finite());
                if applied {
                    z.param.copy_from_slice(&params[mine]);
                    z.adam.update(&mut z.param, &z.grad, lr, optim::clip_factor(norm, clip) / scale);
                    adam.step = z.adam.step;
                    let t = Instant::now();
                    self.comm.all_gather(&z.param, &z.shards, params);
                    comm_seconds += t.elapsed().as_secs_f64();
                    self.stats.bytes_sent += share * bytes;
                }
                self.stats.seconds += comm_seconds;
                self.stats.bytes_sent += share * bytes;
                StepOutcome { grad_norm: norm, applied, next_scale: scaler.scale }
            }
        };
        self.stats.steps += 1;
        outcome
    }
}

#[cfg(feature = "mpi")]
mod mpi_backend {
    //! [`Collective`] over MPI with rsmpi. MPI's default error handler on
    //! `MPI_COMM_WORLD` is `MPI_ERRORS_ARE_FATAL`: a failed collective (a peer that
    //! died) aborts the job, and mpirun ends every rank when one exits abnormally,
    //! naming it.

    use std::cell::RefCell;
    use std::ops::Range;

    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use super::{Collective, BUCKET};

    pub struct Mpi {
        // Dropped last (field order): MPI_Finalize after the communicator's last use.
        world: SimpleCommunicator,
        scratch: RefCell<Vec<f32>>,
        version: String,
        _universe: mpi::environment::Universe,
    }

    impl Mpi {
        pub fn init() -> Result<Mpi, String> {
            let universe = mpi::initialize().ok_or("MPI was already initialised in this process")?;
            let world = universe.world();
            let version = mpi::environment::library_version().unwrap_or_else(|_| "MPI".into());
            let version = version.lines().next().and_then(|l| l.split(',').next()).unwrap_or("MPI").trim().to_string();
            Ok(Mpi { world, scratch: RefCell::new(Vec::new()), version, _universe: universe })
        }
    }

    pub fn abort(code: i32) {
        if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
            // SAFETY: MPI is initialised and not finalised; MPI_Abort does not return.
            unsafe {
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
            }
        }
    }

    fn count(n: usize) -> i32 {
        i32::try_from(n).expect("MPI counts are i32: the caller splits larger buffers")
    }

    impl Drop for Mpi {
        fn drop(&mut self) {
            // A panic unwinding through here must not reach MPI_Finalize, which waits for
            // the other ranks (stuck in a collective this rank will never join): abort.
            if std::thread::panicking() {
                abort(101);
            }
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn backend(&self) -> String {
            format!("MPI ({})", self.version)
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) {
            let mut scratch = self.scratch.borrow_mut();
            for chunk in buf.chunks_mut(BUCKET) {
                scratch.clear();
                scratch.extend_from_slice(chunk);
                self.world.all_reduce_into(&scratch[..], chunk, SystemOperation::sum());
            }
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
            let send = buf.to_vec();
            self.world.all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn reduce_scatter_sum(&self, send: &[f32], shards: &[Range<usize>], recv: &mut [f32]) {
            let first = shards[0].len();
            if shards.iter().all(|s| s.len() == first) && first * shards.len() == send.len() {
                self.world.reduce_scatter_block_into(send, recv, SystemOperation::sum());
                return;
            }
            // Unequal shards (the parameter count is not a multiple of the rank count):
            // MPI_Reduce_scatter_block needs equal blocks, so one rooted reduce per shard.
            for (r, shard) in shards.iter().enumerate() {
                let root = self.world.process_at_rank(r as i32);
                if r == self.rank() {
                    root.reduce_into_root(&send[shard.clone()], recv, SystemOperation::sum());
                } else {
                    root.reduce_into(&send[shard.clone()], SystemOperation::sum());
                }
            }
        }
        fn all_gather(&self, send: &[f32], shards: &[Range<usize>], buf: &mut [f32]) {
            let counts: Vec<i32> = shards.iter().map(|s| count(s.len())).collect();
            let displs: Vec<i32> = shards.iter().map(|s| count(s.start)).collect();
            let mut partition = PartitionMut::new(buf, counts, displs);
            self.world.all_gather_varcount_into(send, &mut partition);
        }
        fn barrier(&self) {
            self.world.barrier();
        }
    }
}
