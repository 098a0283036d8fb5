//! Thread settings of a model's worker and the CPU budget that the workers share.
//!
//! libtorch's intra-op parallelism on CPU is an OpenMP team per calling thread: each model's
//! worker thread sets its own team size before its first op. Two workers each running a team of
//! `cores` threads at once would oversubscribe the cores (and OpenMP threads spin while they
//! wait), so every CPU forward pass first takes its team size from one [`CpuBudget`] of the
//! process's cores, first come first served. With the defaults (every model's team as large as
//! the machine) forward passes of different models take turns; models given smaller teams
//! (`intra_op_threads` in their `config.json`) run side by side as long as their teams fit.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, Once};

/// Settings of a worker thread, made once, on that thread, before its first op.
pub fn configure_worker(intra_op_threads: usize, inter_op_threads: usize, niceness: u8) {
    lower_priority(niceness);
    tch::set_num_threads(intra_op_threads.max(1) as i32);
    // The inter-op pool can be sized once per process, before it is first used.
    static INTER_OP: Once = Once::new();
    INTER_OP.call_once(|| tch::set_num_interop_threads(inter_op_threads.max(1) as i32));
    // Inference only: no autograd bookkeeping on this thread.
    std::mem::forget(tch::no_grad_guard());
}

/// Sets the calling thread's niceness (Linux: per thread; higher is lower priority). libtorch's
/// worker threads, created later by this thread, inherit it, so the HTTP threads get a core at
/// once when they wake: refusals, /health and /metrics stay fast while forward passes keep the
/// cores busy. Lowering a priority needs no privilege. Returns whether it took effect.
pub fn lower_priority(niceness: u8) -> bool {
    if niceness == 0 {
        return true;
    }
    // SAFETY: setpriority has no memory-safety preconditions; `who` 0 is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, i32::from(niceness)) };
    if rc != 0 {
        tracing::warn!(
            niceness,
            error = %std::io::Error::last_os_error(),
            "could not lower the inference thread's priority"
        );
    }
    rc == 0
}

/// Cores shared by the models' CPU forward passes, handed out in arrival order.
pub struct CpuBudget {
    total: usize,
    state: Mutex<BudgetState>,
    turn: Condvar,
}

struct BudgetState {
    free: usize,
    next_ticket: u64,
    waiting: VecDeque<u64>,
}

/// Cores taken from a [`CpuBudget`]; given back when dropped.
pub struct CpuShare<'a> {
    budget: &'a CpuBudget,
    cores: usize,
}

impl CpuBudget {
    pub fn new(total: usize) -> Self {
        let total = total.max(1);
        Self {
            total,
            state: Mutex::new(BudgetState {
                free: total,
                next_ticket: 0,
                waiting: VecDeque::new(),
            }),
            turn: Condvar::new(),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Waits until `cores` (capped at the total) are free and every earlier caller has been
    /// served, then takes them.
    pub fn acquire(&self, cores: usize) -> CpuShare<'_> {
        let cores = cores.clamp(1, self.total);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.waiting.push_back(ticket);
        while s.waiting.front() != Some(&ticket) || s.free < cores {
            s = self.turn.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.waiting.pop_front();
        s.free -= cores;
        drop(s);
        // The next in line may fit in what is left.
        self.turn.notify_all();
        CpuShare {
            budget: self,
            cores,
        }
    }
}

impl Drop for CpuShare<'_> {
    fn drop(&mut self) {
        let mut s = self.budget.state.lock().unwrap_or_else(|e| e.into_inner());
        s.free += self.cores;
        drop(s);
        self.budget.turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn niceness_of_this_thread() -> i32 {
        // SAFETY: getpriority has no memory-safety preconditions; `who` 0 is the calling thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[test]
    fn priority_is_lowered_for_that_thread_and_its_children_only() {
        let before = niceness_of_this_thread();
        if before >= 7 {
            eprintln!("SKIP: this thread already runs at niceness {before}: nothing to lower");
            return;
        }
        let (took, own, child) = std::thread::spawn(|| {
            let took = lower_priority(7);
            let child = std::thread::spawn(niceness_of_this_thread).join().unwrap();
            (took, niceness_of_this_thread(), child)
        })
        .join()
        .unwrap();
        if !took {
            eprintln!("SKIP: this system does not let a thread lower its priority");
            return;
        }
        assert_eq!(own, 7);
        assert_eq!(child, own, "threads started later inherit the niceness");
        assert_eq!(
            niceness_of_this_thread(),
            before,
            "other threads keep theirs"
        );
    }

    #[test]
    fn budget_never_hands_out_more_cores_than_it_has() {
        let budget = Arc::new(CpuBudget::new(4));
        let in_use = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (budget, in_use, peak) = (budget.clone(), in_use.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let want = 1 + i % 4;
                        let _share = budget.acquire(want);
                        let now = in_use.fetch_add(want, Ordering::SeqCst) + want;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        in_use.fetch_sub(want, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= 4, "peak {peak} cores in use of 4");
        assert!(peak >= 2, "shares that fit together must run together");
    }

    #[test]
    fn a_request_larger_than_the_budget_takes_all_of_it() {
        let budget = CpuBudget::new(2);
        let share = budget.acquire(16);
        assert_eq!(share.cores, 2);
    }

    #[test]
    fn waiters_are_served_in_arrival_order() {
        let budget = Arc::new(CpuBudget::new(2));
        let first = budget.acquire(2);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for i in 0..3 {
            let (b, order) = (budget.clone(), order.clone());
            handles.push(std::thread::spawn(move || {
                let _s = b.acquire(2);
                order.lock().unwrap().push(i);
            }));
            // Each waiter is queued before the next one starts.
            while budget.state.lock().unwrap().waiting.len() < i + 1 {
                std::thread::yield_now();
            }
        }
        drop(first);
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    }
}
