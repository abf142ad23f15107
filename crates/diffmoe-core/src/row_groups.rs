//! Rows in groups, each group with its own row vectors: the tokens of an
//! image with its adaLN conditioning, the tokens of an expert with its
//! biases. CPU kernels over them split every group into chunks of rows for
//! rayon's threads; a sum over a group's rows (the gradient of its row
//! vectors) is a sum of per-chunk partial sums added in chunk order, so the
//! bits do not depend on the number of threads.

use core::mem::MaybeUninit;
use core::ops::Range;

use rayon::prelude::*;

/// Elements per chunk (64 KiB of f32).
const CHUNK_ELEMS: usize = 16 * 1024;

/// `[groups, rows, width]` activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowGroups {
    /// Groups (images, experts).
    pub groups: usize,
    /// Rows per group.
    pub rows: usize,
    /// Elements per row.
    pub width: usize,
}

impl RowGroups {
    /// Elements in all.
    pub fn len(&self) -> usize {
        self.groups * self.rows * self.width
    }

    /// Rows per chunk.
    fn chunk_rows(&self) -> usize {
        (CHUNK_ELEMS / self.width.max(1)).clamp(1, self.rows.max(1))
    }

    /// Chunks per group.
    fn chunks(&self) -> usize {
        self.rows.div_ceil(self.chunk_rows())
    }

    /// `(group, rows)` of chunk `task`.
    fn chunk(&self, task: usize) -> (usize, Range<usize>) {
        let (rows, chunks) = (self.chunk_rows(), self.chunks());
        let (g, c) = (task / chunks, task % chunks);
        (g, c * rows..((c + 1) * rows).min(self.rows))
    }

    /// Element range of `rows` of group `g` in a buffer of `per_row`
    /// elements per row.
    pub fn span(&self, g: usize, rows: &Range<usize>, per_row: usize) -> Range<usize> {
        (g * self.rows + rows.start) * per_row..(g * self.rows + rows.end) * per_row
    }

    /// Asserts that `width` is positive and that the buffers hold the
    /// activations and one row of `width` per group.
    pub fn check(&self, what: &str, activations: &[&[f32]], group_rows: &[&[f32]]) {
        assert!(self.width > 0, "{what}: rows of no elements");
        assert!(
            activations.iter().all(|a| a.len() == self.len())
                && group_rows.iter().all(|r| r.len() == self.groups * self.width),
            "{what}: buffers of {:?} and {:?} elements for {self:?}",
            activations.iter().map(|a| a.len()).collect::<Vec<_>>(),
            group_rows.iter().map(|r| r.len()).collect::<Vec<_>>()
        );
    }

    /// `buf` (`per_row` elements per row) split into the chunks, in chunk
    /// order.
    pub fn chunks_of<'a, T>(&self, buf: &'a mut [T], per_row: usize) -> Vec<&'a mut [T]> {
        let mut out = Vec::with_capacity(self.groups * self.chunks());
        if self.rows * per_row == 0 {
            return out;
        }
        for group in buf.chunks_mut(self.rows * per_row).take(self.groups) {
            out.extend(group.chunks_mut(self.chunk_rows() * per_row));
        }
        out
    }

    /// Runs `f(group, rows, out)` on every chunk on rayon's threads, `outs`
    /// holding one item per chunk (from [`Self::chunks_of`]).
    pub fn for_each_chunk<O: Send>(&self, outs: Vec<O>, f: impl Fn(usize, Range<usize>, O) + Sync) {
        outs.into_par_iter().enumerate().for_each(|(task, out)| {
            let (g, rows) = self.chunk(task);
            f(g, rows, out)
        });
    }

    /// Runs `f(group, rows, out, sums)` on every chunk, `sums` (`len`
    /// zeros) a partial sum of the chunk's own, and adds up the partial sums
    /// of each group in chunk order: `[groups, len]`.
    pub fn chunk_sums<O: Send>(
        &self,
        len: usize,
        outs: Vec<O>,
        f: impl Fn(usize, Range<usize>, O, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        let partials: Vec<Vec<f32>> = outs
            .into_par_iter()
            .enumerate()
            .map(|(task, out)| {
                let (g, rows) = self.chunk(task);
                let mut sums = vec![0.0f32; len];
                f(g, rows, out, &mut sums);
                sums
            })
            .collect();
        let mut out = vec![0.0f32; self.groups * len];
        for (task, partial) in partials.iter().enumerate() {
            let g = self.chunk(task).0;
            for (o, p) in out[g * len..][..len].iter_mut().zip(partial) {
                *o += p;
            }
        }
        out
    }

    /// One `()` per chunk, for chunk passes without an output buffer.
    pub fn no_outputs(&self) -> Vec<()> {
        vec![(); self.groups * self.chunks()]
    }
}

/// A buffer of `len` f32 that `fill` writes completely.
pub(crate) fn filled(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    fill(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: `fill` wrote every element (the callers' kernels cover their
    // buffers chunk by chunk).
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_each_group_in_order() {
        for shape in [
            RowGroups { groups: 3, rows: 700, width: 64 },
            RowGroups { groups: 2, rows: 1, width: 5 },
            RowGroups { groups: 0, rows: 4, width: 2 },
        ] {
            let mut buf = vec![0u32; shape.len()];
            let chunks = shape.chunks_of(&mut buf, shape.width);
            assert_eq!(chunks.len(), shape.no_outputs().len());
            shape.for_each_chunk(chunks, |g, rows, out| {
                assert_eq!(out.len(), rows.len() * shape.width);
                out.fill((g * shape.rows + rows.start) as u32 + 1);
            });
            for (i, v) in buf.iter().enumerate() {
                let row = i / shape.width;
                assert!(*v as usize >= 1 && (*v as usize - 1) <= row, "element {i} of {shape:?}");
            }
            // Sums of a group's row indices.
            let sums =
                shape.chunk_sums(1, shape.no_outputs(), |_, rows, (), s| s[0] += rows.map(|r| r as f32).sum::<f32>());
            let expected: f32 = (0..shape.rows).map(|r| r as f32).sum();
            assert!(sums.iter().all(|&s| s == expected) && sums.len() == shape.groups);
        }
    }
}
