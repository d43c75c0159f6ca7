//! What a root did in this process, counted as it happens: the numbers
//! tests of duplicate suppression read ([`Stats::snapshot`]) and the
//! Prometheus metrics an operator scrapes ([`Stats::register`], served by
//! `unlade snapshotter --metrics-address`). Every update is an atomic add
//! or one histogram observation, cheap enough to stay on always; nothing
//! here knows how the numbers are served.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// One stage of one layer's way into a snapshot, timed per layer (by the
/// caller that did the work, not those that waited for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The blob's copy into the content store: the download from a
    /// registry (all its connections and retries) or the copy of a
    /// layout's file, from its download slot to its publication.
    Fetch,
    /// The decompression, as CPU time of the decoder (a streaming
    /// decoder's thread, or the whole-buffer inflate); overlaps the apply.
    Decode,
    /// The apply, wall time from its permit to its last file: parsing,
    /// the file operations and, for a download, waiting for bytes.
    Apply,
    /// Making the snapshot durable (by its durability mode) and the
    /// rename that commits it; waiting for the layer below is not counted.
    Commit,
}

impl Stage {
    /// Every stage, in the order a layer goes through them.
    pub const ALL: [Stage; 4] = [Stage::Fetch, Stage::Decode, Stage::Apply, Stage::Commit];

    /// The stage's name: the `stage` label of the metric and the key of a
    /// pull's summary.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Decode => "decode",
            Stage::Apply => "apply",
            Stage::Commit => "commit",
        }
    }
}

/// The time the stages of some layers took, summed: what one unpack or
/// pull did itself (see [`crate::Unpacked::stages`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimes([Duration; 4]);

impl StageTimes {
    /// Adds `d` to `stage`.
    pub fn add(&mut self, stage: Stage, d: Duration) {
        self.0[stage as usize] += d;
    }

    /// The total of `stage`.
    pub fn get(&self, stage: Stage) -> Duration {
        self.0[stage as usize]
    }
}

type Labels = [(&'static str, &'static str); 1];
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Per-layer stage times from 5 ms to about 80 s, doubling.
fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Counters and histograms of the work a root did in this process.
#[derive(Debug)]
pub struct Stats {
    /// Layers applied into a snapshot (by this process).
    pub layers_applied: Counter,
    /// Layer blobs copied into the content store (by this process).
    pub blobs_ingested: Counter,
    /// Blob bytes read from sources into the content store: every byte a
    /// registry sent for a layer, once more for bytes sent again after a
    /// split download fell back to one stream.
    pub bytes_fetched: Counter,
    /// File data bytes written into snapshots.
    pub bytes_written: Counter,
    /// Calls that found a layer's or blob's work under way (in this
    /// process or another) and waited for it instead of doing it: label
    /// `what`, `layer` or `blob`.
    joins: Family<Labels, Counter>,
    /// Download attempts that failed and were tried again (a whole blob's
    /// stream or one chunk of a split download).
    pub fetch_retries: Counter,
    /// Split downloads that went on over one stream; label `why`.
    range_fallbacks: Family<Labels, Counter>,
    /// Per-layer stage times; label `stage` ([`Stage::name`]).
    stages: Histograms,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            layers_applied: Counter::default(),
            blobs_ingested: Counter::default(),
            bytes_fetched: Counter::default(),
            bytes_written: Counter::default(),
            joins: Family::default(),
            fetch_retries: Counter::default(),
            range_fallbacks: Family::default(),
            stages: Family::new_with_constructor(stage_histogram),
        }
    }
}

/// Why a split download went on over one stream (the `why` label of
/// `unlade_range_fallbacks_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeFallback {
    /// The source answered a range with the whole blob (200).
    Ignored,
    /// The source refused ranges (416, 501) or answered another range.
    Refused,
    /// A chunk kept failing or stalled past its retries.
    Failed,
    /// A chunk's answer was longer than asked.
    Longer,
    /// No thread could be started for a connection.
    NoThread,
}

impl RangeFallback {
    fn name(self) -> &'static str {
        match self {
            RangeFallback::Ignored => "ignored",
            RangeFallback::Refused => "refused",
            RangeFallback::Failed => "chunk_failed",
            RangeFallback::Longer => "longer_answer",
            RangeFallback::NoThread => "no_thread",
        }
    }
}

impl Stats {
    /// Counts a caller that waited for another's work on a `layer`
    /// (snapshot) or a `blob`.
    pub(crate) fn joined(&self, what: &'static str) {
        self.joins.get_or_create(&[("what", what)]).inc();
    }

    /// Counts a split download that went on over one stream.
    pub(crate) fn range_fallback(&self, why: RangeFallback) {
        self.range_fallbacks
            .get_or_create(&[("why", why.name())])
            .inc();
    }

    /// Records one layer's `stage` taking `d`.
    pub(crate) fn observe(&self, stage: Stage, d: Duration) {
        self.stages
            .get_or_create(&[("stage", stage.name())])
            .observe(d.as_secs_f64());
    }

    /// The number of callers that waited for another's work on `what`
    /// (`layer` or `blob`).
    pub fn joins(&self, what: &'static str) -> u64 {
        self.joins.get(&[("what", what)]).map_or(0, |c| c.get())
    }

    /// A copy of the two counters the deduplication tests read.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            layers_applied: self.layers_applied.get(),
            blobs_ingested: self.blobs_ingested.get(),
        }
    }

    /// Registers these metrics in `r` (names as `unlade_*` when `r` has
    /// that prefix): what a runtime embedding the library serves beside
    /// its own, and what `unlade snapshotter` serves.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "layers_applied",
            "Layers applied into snapshots by this process",
            self.layers_applied.clone(),
        );
        r.register(
            "blobs_fetched",
            "Layer blobs copied into the content store by this process",
            self.blobs_ingested.clone(),
        );
        r.register_with_unit(
            "fetched",
            "Blob bytes read from registries and layouts into the content store",
            Unit::Bytes,
            self.bytes_fetched.clone(),
        );
        r.register_with_unit(
            "written",
            "File data bytes written into snapshots",
            Unit::Bytes,
            self.bytes_written.clone(),
        );
        r.register(
            "dedup_joins",
            "Calls that waited for another's work on a layer or blob instead of doing it",
            self.joins.clone(),
        );
        r.register(
            "fetch_retries",
            "Failed download attempts (a blob's stream or a chunk) tried again",
            self.fetch_retries.clone(),
        );
        r.register(
            "range_fallbacks",
            "Split downloads that went on over one stream, by why",
            self.range_fallbacks.clone(),
        );
        r.register_with_unit(
            "layer_stage",
            "Time of one layer's stage (fetch, decode CPU, apply, commit)",
            Unit::Seconds,
            self.stages.clone(),
        );
    }
}

/// A copy of [`Stats`]'s work counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::layers_applied`].
    pub layers_applied: u64,
    /// See [`Stats::blobs_ingested`].
    pub blobs_ingested: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn registered_metrics_encode_with_their_labels() {
        let s = Stats::default();
        s.bytes_fetched.inc_by(1234);
        s.joined("blob");
        s.range_fallback(RangeFallback::Refused);
        s.observe(Stage::Apply, Duration::from_millis(30));
        let mut r = Registry::with_prefix("unlade");
        s.register(&mut r);
        let mut out = String::new();
        encode(&mut out, &r).unwrap();
        assert!(out.contains("unlade_fetched_bytes_total 1234\n"), "{out}");
        assert!(
            out.contains("unlade_dedup_joins_total{what=\"blob\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("unlade_range_fallbacks_total{why=\"refused\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("unlade_layer_stage_seconds_count{stage=\"apply\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("unlade_layer_stage_seconds_bucket{le=\"0.04\",stage=\"apply\"} 1\n"),
            "{out}"
        );
        assert_eq!(s.joins("blob"), 1);
        assert_eq!(s.joins("layer"), 0);
        assert!(
            out.contains("unlade_layer_stage_seconds_sum{stage=\"apply\"} 0.03\n"),
            "{out}"
        );
    }
}
