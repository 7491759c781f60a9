//! Top-k selection that reproduces PyTorch's CPU `torch.topk(largest=True, sorted=True)` exactly,
//! ties included.
//!
//! Why: Gemma 4's router takes the top-k of softmax probabilities computed from logits rounded to the
//! model dtype, so exact ties between experts are common in bf16, and which tied expert is chosen changes
//! the output. PyTorch breaks ties by whatever order its algorithm leaves them in: it builds
//! `(value, index)` pairs and calls libstdc++'s `std::partial_sort` when `k * 64 <= n`, otherwise
//! `std::nth_element` followed by `std::sort` of the first `k - 1`, with the comparator `a > b` (NaN
//! first). This module is a transcription of those libstdc++ algorithms (introselect, introsort,
//! heap select), so the chosen indices match transformers bit for bit.

type Elem = (f32, u32);

#[inline]
fn comp(a: &Elem, b: &Elem) -> bool {
    (a.0.is_nan() && !b.0.is_nan()) || a.0 > b.0
}

/// Indices and values of the `k` largest entries of `values`, in PyTorch's order.
pub fn topk_torch(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let n = values.len();
    assert!(k >= 1 && k <= n, "top-{k} of {n} values");
    let mut q: Vec<Elem> = values.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
    if k * 64 <= n {
        partial_sort(&mut q, 0, k, n);
    } else {
        nth_element(&mut q, 0, k - 1, n);
        sort(&mut q, 0, k - 1);
    }
    q[..k].iter().map(|&(v, i)| (i, v)).collect()
}

fn lg(n: usize) -> usize {
    (usize::BITS - 1 - n.leading_zeros()) as usize
}

fn nth_element(q: &mut [Elem], first: usize, nth: usize, last: usize) {
    if first == last || nth == last {
        return;
    }
    introselect(q, first, nth, last, lg(last - first) * 2);
}

fn introselect(q: &mut [Elem], mut first: usize, nth: usize, mut last: usize, mut depth: usize) {
    while last - first > 3 {
        if depth == 0 {
            heap_select(q, first, nth + 1, last);
            q.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(q, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(q, first, last);
}

fn sort(q: &mut [Elem], first: usize, last: usize) {
    if first != last {
        introsort_loop(q, first, last, lg(last - first) * 2);
        final_insertion_sort(q, first, last);
    }
}

fn introsort_loop(q: &mut [Elem], first: usize, mut last: usize, mut depth: usize) {
    while last - first > 16 {
        if depth == 0 {
            partial_sort(q, first, last, last);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(q, first, last);
        introsort_loop(q, cut, last, depth);
        last = cut;
    }
}

fn final_insertion_sort(q: &mut [Elem], first: usize, last: usize) {
    if last - first > 16 {
        insertion_sort(q, first, first + 16);
        for i in first + 16..last {
            unguarded_linear_insert(q, i);
        }
    } else {
        insertion_sort(q, first, last);
    }
}

fn unguarded_partition_pivot(q: &mut [Elem], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first(q, first, first + 1, mid, last - 1);
    unguarded_partition(q, first + 1, last, first)
}

fn move_median_to_first(q: &mut [Elem], result: usize, a: usize, b: usize, c: usize) {
    let pick = if comp(&q[a], &q[b]) {
        if comp(&q[b], &q[c]) {
            b
        } else if comp(&q[a], &q[c]) {
            c
        } else {
            a
        }
    } else if comp(&q[a], &q[c]) {
        a
    } else if comp(&q[b], &q[c]) {
        c
    } else {
        b
    };
    q.swap(result, pick);
}

fn unguarded_partition(q: &mut [Elem], mut first: usize, mut last: usize, pivot: usize) -> usize {
    loop {
        while comp(&q[first], &q[pivot]) {
            first += 1;
        }
        last -= 1;
        while comp(&q[pivot], &q[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        q.swap(first, last);
        first += 1;
    }
}

fn insertion_sort(q: &mut [Elem], first: usize, last: usize) {
    if first == last {
        return;
    }
    for i in first + 1..last {
        if comp(&q[i], &q[first]) {
            let v = q[i];
            q.copy_within(first..i, first + 1);
            q[first] = v;
        } else {
            unguarded_linear_insert(q, i);
        }
    }
}

fn unguarded_linear_insert(q: &mut [Elem], mut last: usize) {
    let v = q[last];
    let mut next = last - 1;
    while comp(&v, &q[next]) {
        q[last] = q[next];
        last = next;
        next -= 1;
    }
    q[last] = v;
}

fn partial_sort(q: &mut [Elem], first: usize, middle: usize, last: usize) {
    heap_select(q, first, middle, last);
    let mut end = middle;
    while end - first > 1 {
        end -= 1;
        pop_heap(q, first, end, end);
    }
}

fn heap_select(q: &mut [Elem], first: usize, middle: usize, last: usize) {
    make_heap(q, first, middle);
    for i in middle..last {
        if comp(&q[i], &q[first]) {
            pop_heap(q, first, middle, i);
        }
    }
}

fn make_heap(q: &mut [Elem], first: usize, last: usize) {
    let len = last - first;
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let v = q[first + parent];
        adjust_heap(q, first, parent, len, v);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

fn pop_heap(q: &mut [Elem], first: usize, last: usize, result: usize) {
    let v = q[result];
    q[result] = q[first];
    adjust_heap(q, first, 0, last - first, v);
}

fn adjust_heap(q: &mut [Elem], first: usize, mut hole: usize, len: usize, v: Elem) {
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if comp(&q[first + child], &q[first + child - 1]) {
            child -= 1;
        }
        q[first + hole] = q[first + child];
        hole = child;
    }
    if len & 1 == 0 && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        q[first + hole] = q[first + child - 1];
        hole = child - 1;
    }
    // push_heap
    let mut parent = hole.wrapping_sub(1) / 2;
    while hole > top && comp(&q[first + parent], &v) {
        q[first + hole] = q[first + parent];
        hole = parent;
        parent = hole.wrapping_sub(1) / 2;
    }
    q[first + hole] = v;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[f32], k: usize) -> Vec<u32> {
        topk_torch(v, k).into_iter().map(|(i, _)| i).collect()
    }

    /// Expected indices recorded from torch 2.15 (CPU): `torch.topk(torch.tensor([v]), k).indices`.
    #[test]
    fn ties_break_exactly_as_torch() {
        let c: &[(&[f32], usize, &[u32])] = &[
            (&[1., 2., 2., 2., 0., 0., 0., 0.], 3, &[1, 3, 2]),
            (&[0.1, 0.3, 0.2, 0.3, 0.3, 0.05, 0.02, 0.03], 3, &[1, 4, 3]),
            (&[0.5; 8], 3, &[6, 5, 4]),
            (&[0.3, 0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1], 3, &[1, 0, 3]),
            (&[0.3, 0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1], 2, &[1, 0]),
            (&[0.1, 0.3, 0.1, 0.3, 0.1, 0.3, 0.1, 0.3], 3, &[1, 7, 5]),
            (&[0.1, 0.3, 0.1, 0.3, 0.1, 0.3, 0.1, 0.3], 2, &[1, 7]),
            (&[0.9, 0.3, 0.1, 0.3, 0.1, 0.3, 0.1, 0.3], 3, &[0, 5, 1]),
            (&[0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], 3, &[0, 6, 5]),
            (&[0.1; 128], 8, &[84, 87, 86, 85, 82, 81, 88, 83]),
        ];
        for (v, k, want) in c {
            assert_eq!(ids(v, *k), *want, "topk({v:?}, {k})");
        }
        // The partial_sort path (k * 64 <= n) and a longer std::sort (k - 1 > 16).
        assert_eq!(ids(&[0.1; 512], 8), [7, 4, 1, 3, 5, 0, 2, 6]);
        let mod5 = |n: usize| -> Vec<f32> { (0..n).map(|i| ((i * 37) % 5) as f32).collect() };
        assert_eq!(ids(&mod5(700), 4), [12, 7, 17, 2]);
        assert_eq!(ids(&mod5(100), 20), [17, 2, 62, 7, 12, 57, 97, 92, 87, 52, 42, 82, 67, 47, 32, 22, 77, 72, 27, 37]);
    }

    #[test]
    fn distinct_values_come_out_sorted_descending() {
        let mut s = 12345u64;
        for n in [8usize, 33, 128, 600] {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (s >> 33) as f32
                })
                .collect();
            for k in [1usize, 3, 8] {
                let got = topk_torch(&v, k);
                let mut want: Vec<(u32, f32)> = v.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1));
                assert_eq!(got.iter().map(|x| x.1).collect::<Vec<_>>(), want[..k].iter().map(|x| x.1).collect::<Vec<_>>(), "n={n} k={k}");
            }
        }
    }
}
