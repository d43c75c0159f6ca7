//! A [`Progress`] display for pulls and unpacks, on stderr: on a terminal
//! a live table (one line per layer: downloaded / total, state; and an
//! overall line) redrawn ten times a second; otherwise one plain log line
//! per state change.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use unlade::oci::image::Layer;

use unlade::pipeline::unpack::{Progress, ProgressEvent};

#[derive(Clone)]
struct Row {
    digest: String,
    size: u64,
    fetched: u64,
    state: &'static str,
}

struct State {
    rows: Vec<Row>,
    done: bool,
    drawn: usize,
    started: Instant,
}

/// The display (see the module docs). Create with [`Display::new`], hand
/// it to the unpack as its `Progress`, call [`Display::finish`].
pub struct Display {
    me: std::sync::Weak<Display>,
    state: Mutex<State>,
    cv: Condvar,
    live: bool,
}

fn short(d: &unlade::Digest) -> String {
    let s = d.to_string();
    s[..s.len().min(19)].to_string()
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
}

impl Display {
    /// A display, live if stderr is a terminal; it starts drawing when
    /// the unpack starts.
    pub fn new() -> Arc<Display> {
        Arc::new_cyclic(|me| Display {
            me: me.clone(),
            state: Mutex::new(State {
                rows: Vec::new(),
                done: false,
                drawn: 0,
                started: Instant::now(),
            }),
            cv: Condvar::new(),
            live: std::io::stderr().is_terminal(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Redraws until `finish`, which draws the last frame itself: the loop
    /// checks `done` before drawing, so that frame is never printed twice.
    fn draw_loop(&self) {
        let mut st = self.lock();
        loop {
            if st.done {
                return;
            }
            Self::draw(&mut st);
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn draw(st: &mut State) {
        let mut out = String::new();
        if st.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", st.drawn));
        }
        let (mut got, mut total) = (0, 0);
        for r in &st.rows {
            got += r.fetched.min(r.size);
            total += r.size;
            out.push_str(&format!(
                "\x1b[2K{}  {:>10} / {:<10}  {}\n",
                r.digest,
                mib(r.fetched),
                mib(r.size),
                r.state
            ));
        }
        let committed = st
            .rows
            .iter()
            .filter(|r| r.state.starts_with("done"))
            .count();
        out.push_str(&format!(
            "\x1b[2Kelapsed {:.1}s  fetched {} / {}  layers {}/{}\n",
            st.started.elapsed().as_secs_f64(),
            mib(got),
            mib(total),
            committed,
            st.rows.len()
        ));
        st.drawn = st.rows.len() + 1;
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(out.as_bytes());
        let _ = e.flush();
    }

    /// Stops the drawing (after a last frame).
    pub fn finish(&self) {
        self.lock().done = true;
        self.cv.notify_all();
        if self.live {
            // Let the last frame out before the caller prints.
            let mut st = self.lock();
            Self::draw(&mut st);
            st.drawn = 0;
        }
    }
}

impl Progress for Display {
    fn start(&self, image: &unlade::oci::image::Image) {
        let mut st = self.lock();
        st.rows = image
            .layers
            .iter()
            .map(|l| Row {
                digest: short(&l.digest),
                size: l.size,
                fetched: 0,
                state: "waiting",
            })
            .collect();
        drop(st);
        if self.live {
            // The thread holds the display until finish() ends it.
            if let Some(d) = self.me.upgrade() {
                // Without the thread the display just stays still.
                let _ = std::thread::Builder::new()
                    .name("unlade-progress".into())
                    .spawn(move || d.draw_loop());
            }
        }
    }

    fn event(&self, index: usize, layer: &Layer, event: ProgressEvent) {
        let mut st = self.lock();
        let Some(row) = st.rows.get_mut(index) else {
            return;
        };
        let state = match event {
            ProgressEvent::Present => "done (present)",
            ProgressEvent::Fetching(n) => {
                row.fetched = n;
                if row.state == "applying" {
                    return;
                }
                "downloading"
            }
            ProgressEvent::Fetched => {
                row.fetched = row.size;
                if row.state == "applying" {
                    return;
                }
                "downloaded"
            }
            ProgressEvent::Applying => "applying",
            ProgressEvent::Committed(unlade::pipeline::flight::Role::Waited) => "done (by another)",
            ProgressEvent::Committed(_) => "done",
            // An event this display does not know: keep the row as it is.
            _ => return,
        };
        let changed = row.state != state;
        row.state = state;
        if !self.live && changed {
            let line = format!("layer {} ({}): {state}\n", layer.digest, mib(layer.size));
            drop(st);
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}
