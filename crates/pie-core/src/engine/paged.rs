//! Scattered writes, what a paged cache needs from the engine. Continuous
//! batching keeps every layer as one flat area of token rows cut into blocks;
//! a step writes each request's new tokens into that request's own blocks, so
//! the rows written are scattered over the area rather than appended. The
//! layer's valid length is then its high-water mark (the highest row ever
//! written): what a prefetch moves. A pooled layer writes back exactly the rows
//! written, never the rows around them.

use super::Engine;
use crate::backend::{Backend, Stream};
use crate::error::{PieError, Result};

impl<B: Backend> Engine<B> {
    /// Records that token rows `ranges` (each `(start, n)`, in any order) of
    /// `layer` were written on `stream`: a pooled layer queues a write-back of
    /// each range from its staging slot, after the compute that wrote it. The
    /// layer's valid length becomes the larger of what it was and the end of
    /// the last row written (the high-water mark a prefetch moves). Returns it.
    pub fn layer_written_ranges(
        &mut self,
        layer: usize,
        ranges: &[(usize, usize)],
        stream: Stream,
    ) -> Result<usize> {
        self.check()?;
        self.check_layer(layer)?;
        let cap = self.capacity();
        let mut end = self.shared.page_table.seq_len(layer);
        let mut tokens = 0usize;
        for &(start, n) in ranges {
            let stop = start.checked_add(n).filter(|&s| s <= cap).ok_or_else(|| {
                PieError::config(format!(
                    "rows {start}..{} of layer {layer} lie beyond its capacity of {cap} rows",
                    start.saturating_add(n)
                ))
            })?;
            if n > 0 {
                end = end.max(stop);
                tokens += n;
            }
        }
        if tokens == 0 {
            return Ok(end);
        }
        let (schedule, step) = (&self.schedule, self.step);
        let mut ops = Vec::new();
        schedule
            .written_ranges(layer, ranges, step, &mut |op| ops.push(op))
            .map_err(|()| {
                PieError::state(format!("layer_written_ranges({layer}) before layer_ready"))
            })?;
        self.shared.page_table.set_seq_len(layer, end);
        self.step_tokens = self.step_tokens.max(tokens);
        if !ops.is_empty() {
            self.shared
                .backend
                .record(&self.shared.events.written[layer], stream)?;
            for op in ops {
                self.submit.push(op)?;
            }
        }
        Ok(end)
    }

    /// Sets how many rows of `layer` are valid (what a prefetch moves), up or
    /// down, outside a step: for data written straight into a layer's
    /// authoritative copy while quiesced (a block copy into a pooled layer's
    /// host buffer when a request forks or is restored), or dropped. Waits for
    /// every copy first; staging contents are fetched again afterwards.
    pub fn set_extent(&mut self, layer: usize, rows: usize) -> Result<()> {
        self.check()?;
        self.check_layer(layer)?;
        let cap = self.capacity();
        if rows > cap {
            return Err(PieError::config(format!(
                "layer {layer} cannot hold {rows} rows; its capacity is {cap}"
            )));
        }
        if self.in_step {
            return Err(PieError::state(format!(
                "set_extent({layer}) inside a step; call it between steps"
            )));
        }
        self.quiesce()?;
        self.shared.page_table.set_seq_len(layer, rows);
        self.resume()
    }
}
