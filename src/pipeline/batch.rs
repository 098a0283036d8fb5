//! Batch formation: pure logic over a channel, unit-tested here.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// Batch formation settings of one model.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
}

/// Takes the next batch: blocks for a first item, then takes whatever is already queued and
/// waits up to `delay` (from the first item's arrival at the thread) for more, stopping at `max`.
/// Returns `None` once the channel is closed and drained.
pub fn next_batch<T>(rx: &Receiver<T>, max: usize, delay: Duration) -> Option<Vec<T>> {
    let first = rx.recv().ok()?;
    let mut batch = Vec::with_capacity(max);
    batch.push(first);
    let deadline = Instant::now() + delay;
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => {
                batch.push(item);
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(item) => batch.push(item),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    #[test]
    fn takes_what_is_queued_up_to_max() {
        let (tx, rx) = sync_channel(16);
        for i in 0..10 {
            tx.send(i).unwrap();
        }
        assert_eq!(next_batch(&rx, 4, Duration::ZERO), Some(vec![0, 1, 2, 3]));
        assert_eq!(next_batch(&rx, 4, Duration::ZERO), Some(vec![4, 5, 6, 7]));
        assert_eq!(next_batch(&rx, 4, Duration::ZERO), Some(vec![8, 9]));
    }

    #[test]
    fn zero_delay_does_not_wait_for_more() {
        let (tx, rx) = sync_channel(4);
        tx.send(1).unwrap();
        let start = Instant::now();
        let batch = next_batch(&rx, 8, Duration::ZERO).unwrap();
        assert_eq!(batch, vec![1]);
        // Nothing was waited for: the channel still has its sender, so a wait would block.
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn waits_up_to_delay_for_late_arrivals() {
        let (tx, rx) = sync_channel(4);
        tx.send(1).unwrap();
        // The sender moves to the thread and is dropped after its send, which ends the wait.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(2).unwrap();
        });
        let batch = next_batch(&rx, 8, Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert_eq!(batch, vec![1, 2]);
    }

    #[test]
    fn stops_waiting_at_the_deadline() {
        let (tx, rx) = sync_channel(4);
        tx.send(1).unwrap();
        // The sender stays alive: only the deadline can end this batch.
        let batch = next_batch(&rx, 8, Duration::from_millis(30)).unwrap();
        assert_eq!(batch, vec![1]);
        drop(tx);
    }

    #[test]
    fn full_batch_returns_before_the_deadline() {
        let (tx, rx) = sync_channel(4);
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        // max reached: no wait even though the delay is long and the sender is alive.
        assert_eq!(
            next_batch(&rx, 2, Duration::from_secs(3600)),
            Some(vec![1, 2])
        );
        drop(tx);
    }

    #[test]
    fn closed_channel_ends_after_draining() {
        let (tx, rx) = sync_channel(4);
        tx.send(7).unwrap();
        drop(tx);
        assert_eq!(next_batch(&rx, 8, Duration::from_secs(3600)), Some(vec![7]));
        assert_eq!(next_batch(&rx, 8, Duration::from_secs(3600)), None);
    }
}
