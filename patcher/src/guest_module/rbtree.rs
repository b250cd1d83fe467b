//! The guest's module address tree, changed from outside: a red-black tree
//! (lib/rbtree.c's `struct rb_node`) that lpvmm cannot change the kernel's way, by
//! running `rb_insert_color` or `rb_erase` in the guest. So in a pause it reads the
//! tree's nodes in order, adds or drops one, and writes the whole tree again, balanced
//! and coloured so that every red-black rule holds: the kernel's own insertions and
//! erasures go on from there. A tree of modules has a few dozen nodes.
//!
//! The tree is one of the two of a latched tree (include/linux/rbtree_latch.h), whose
//! readers run without locks and retry when its sequence moved; the caller moves it.

use std::collections::HashSet;

/// No module tree is bigger (a node per module and memory kind); a walk that finds
/// more is reading something else.
pub(crate) const MAX_NODES: usize = 8192;

/// `__rb_parent_color`'s colour bit (lib/rbtree.c: `RB_BLACK` is 1, `RB_RED` 0).
const BLACK: u64 = 1;

/// Where the parts of a `struct rb_node` are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RbLayout {
    pub(crate) parent_color: u64,
    pub(crate) right: u64,
    pub(crate) left: u64,
}

/// What one node holds once the tree is rebuilt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Links {
    pub(crate) node: u64,
    pub(crate) parent_color: u64,
    pub(crate) left: u64,
    pub(crate) right: u64,
}

/// A tree written again: its root, and every node's links.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rebuilt {
    pub(crate) root: u64,
    pub(crate) links: Vec<Links>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum TreeError {
    #[error("reading the module tree at {0:#x} failed")]
    Read(u64),
    #[error("the module tree has a loop or more than {MAX_NODES} nodes")]
    Malformed,
}

/// The nodes of the tree under `root`, in order (left to right), read with `read`.
/// Bounded: a loop or a tree too big is an error.
pub(crate) fn in_order(
    root: u64,
    rb: RbLayout,
    read: &dyn Fn(u64) -> Option<u64>,
) -> Result<Vec<u64>, TreeError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = Vec::new();
    let mut at = root;
    loop {
        while at != 0 {
            if !seen.insert(at) || seen.len() > MAX_NODES {
                return Err(TreeError::Malformed);
            }
            stack.push(at);
            at = read(at + rb.left).ok_or(TreeError::Read(at))?;
        }
        let Some(node) = stack.pop() else {
            return Ok(out);
        };
        out.push(node);
        at = read(node + rb.right).ok_or(TreeError::Read(node))?;
    }
}

/// The balanced red-black tree of `sorted` (nodes in key order): each subtree's root
/// is its middle node, so the depths of its empty links differ by at most one; the
/// nodes of the deepest level are red when that level is not full, every other node
/// black. Every path from the root to an empty link then passes the same number of
/// black nodes, and no red node has a red child.
pub(crate) fn balanced(sorted: &[u64]) -> Rebuilt {
    let mut links = Vec::with_capacity(sorted.len());
    let depth = deepest(sorted.len());
    let full = sorted.len() + 1 == 1 << (depth + 1);
    let root = place(sorted, 0, 0, depth, full, &mut links);
    Rebuilt { root, links }
}

/// The depth of the deepest node of a middle-split tree of `n` nodes (the root: 0).
fn deepest(n: usize) -> u32 {
    if n == 0 {
        0
    } else {
        usize::BITS - 1 - n.leading_zeros()
    }
}

fn place(
    nodes: &[u64],
    parent: u64,
    depth: u32,
    deepest: u32,
    full: bool,
    out: &mut Vec<Links>,
) -> u64 {
    if nodes.is_empty() {
        return 0;
    }
    let mid = nodes.len() / 2;
    let node = nodes[mid];
    let red = depth == deepest && depth > 0 && !full;
    let left = place(&nodes[..mid], node, depth + 1, deepest, full, out);
    let right = place(&nodes[mid + 1..], node, depth + 1, deepest, full, out);
    out.push(Links {
        node,
        parent_color: parent | if red { 0 } else { BLACK },
        left,
        right,
    });
    node
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Every red-black rule, and that the in-order walk gives `sorted` back.
    fn check(sorted: &[u64], t: &Rebuilt) {
        let by: HashMap<u64, Links> = t.links.iter().map(|l| (l.node, *l)).collect();
        assert_eq!(by.len(), sorted.len());
        if t.root != 0 {
            assert_eq!(
                by[&t.root].parent_color, BLACK,
                "a black root without parent"
            );
        }
        // Black height of each subtree, checking the colours and parents on the way.
        fn height(by: &HashMap<u64, Links>, n: u64, parent: u64) -> u32 {
            if n == 0 {
                return 1;
            }
            let l = by[&n];
            assert_eq!(l.parent_color & !1, parent);
            let red = l.parent_color & 1 == 0;
            if red {
                for c in [l.left, l.right] {
                    assert!(c == 0 || by[&c].parent_color & 1 == 1, "red child of red");
                }
            }
            let (a, b) = (height(by, l.left, n), height(by, l.right, n));
            assert_eq!(a, b, "black heights differ under {n:#x}");
            a + u32::from(!red)
        }
        height(&by, t.root, 0);
        let rb = RbLayout {
            parent_color: 0,
            right: 8,
            left: 16,
        };
        let read = |a: u64| {
            let l = by.get(&(a & !31))?;
            Some(match a & 31 {
                8 => l.right,
                16 => l.left,
                _ => l.parent_color,
            })
        };
        assert_eq!(in_order(t.root, rb, &read).unwrap(), sorted);
    }

    #[test]
    fn every_size_up_to_a_thousand_gives_a_valid_red_black_tree() {
        for n in 0..1000u64 {
            let sorted: Vec<u64> = (1..=n).map(|i| 0x1000 + i * 32).collect();
            check(&sorted, &balanced(&sorted));
        }
    }

    #[test]
    fn a_walk_of_a_looping_or_unreadable_tree_stops_with_an_error() {
        let rb = RbLayout {
            parent_color: 0,
            right: 8,
            left: 16,
        };
        // The root's left child is the root.
        let looped = |a: u64| Some(if a == 0x1010 { 0x1000 } else { 0 });
        assert_eq!(in_order(0x1000, rb, &looped), Err(TreeError::Malformed));
        assert_eq!(
            in_order(0x1000, rb, &|_| None),
            Err(TreeError::Read(0x1000))
        );
        assert_eq!(in_order(0, rb, &|_| None), Ok(vec![]));
    }
}
