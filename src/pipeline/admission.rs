//! Places in a model's pipeline: one per image, taken at admission, moved with the image's work
//! from the decode job to the queue to the forward pass, and given back when that work is
//! finished or dropped, never when the request that asked for it happens to end.

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The places of one pipeline (`queue_capacity`).
pub struct Places {
    semaphore: Arc<Semaphore>,
    capacity: usize,
    in_use: IntGauge,
}

/// One image's place. Dropping it gives the place back.
pub struct Place {
    _permit: OwnedSemaphorePermit,
    in_use: IntGauge,
}

impl Places {
    /// `in_use` follows the places taken (the `tch_serve_inflight_images` series).
    pub fn new(capacity: usize, in_use: IntGauge) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(capacity)),
            capacity,
            in_use,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Places taken now.
    pub fn in_use(&self) -> usize {
        self.capacity - self.semaphore.available_permits()
    }

    /// `n` places at once, or none at all without waiting.
    pub fn try_take(&self, n: usize) -> Option<Vec<Place>> {
        if n == 0 {
            return Some(Vec::new());
        }
        let mut permit = self
            .semaphore
            .clone()
            .try_acquire_many_owned(u32::try_from(n).ok()?)
            .ok()?;
        self.in_use.add(n as i64);
        let mut places = Vec::with_capacity(n);
        for _ in 1..n {
            let one = permit
                .split(1)
                .expect("a permit of n > 1 places splits off one");
            places.push(Place {
                _permit: one,
                in_use: self.in_use.clone(),
            });
        }
        places.push(Place {
            _permit: permit,
            in_use: self.in_use.clone(),
        });
        Some(places)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.in_use.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_all_or_none_and_come_back_one_by_one() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let places = Places::new(4, gauge.clone());
        let three = places.try_take(3).unwrap();
        assert_eq!((places.in_use(), gauge.get()), (3, 3));
        assert!(places.try_take(2).is_none(), "two do not fit in one");
        assert_eq!(places.in_use(), 3, "a refusal takes nothing");
        let mut three = three.into_iter();
        drop(three.next());
        assert_eq!((places.in_use(), gauge.get()), (2, 2));
        let two = places.try_take(2).unwrap();
        assert_eq!(places.in_use(), 4);
        drop(two);
        drop(three);
        assert_eq!((places.in_use(), gauge.get()), (0, 0));
        assert!(places.try_take(5).is_none());
        assert_eq!(places.try_take(0).unwrap().len(), 0);
    }
}
