//! The allowlist table: a leaf-pushed multibit trie in a flat array of nodes.
//!
//! Why not the kernel's LPM trie: its lookup walks one node per distinct
//! prefix bit on the path, so it slows as the allowlist grows (measured here:
//! 33 ns at 2 entries, 106 ns at 4000). This table's lookup reads at most
//! one node per address byte: the cost depends on how long the matching
//! prefix is, never on how many prefixes there are.
//!
//! Layout of one table (the map holds two, see [`crate::Config::active_table`]):
//! - node `V4_ROOT + b0` covers IPv4 addresses `b0.*`; its cell `b1` says what
//!   `b0.b1.*` gets. The 65536 cells of nodes `0..256` are the 16-bit root.
//! - node `V6_ROOT + b0` does the same for the first 16 bits of IPv6.
//! - every other node is 256 cells for the next address byte.
//!
//! A cell is [`DENY`], [`ALLOW`], or the index of the child node for the next
//! byte. An allowlist is a union of prefixes, so "allow" can be pushed down to
//! whole cells (leaf pushing) and the first non-child cell is the answer.

/// Cells per node: one per value of an address byte.
pub const NODE_CELLS: usize = 256;

/// One node: 1 KiB.
pub type Node = [u32; NODE_CELLS];

/// The address is not covered by any allowlist prefix.
pub const DENY: u32 = 0;
/// The address is covered by an allowlist prefix.
pub const ALLOW: u32 = 1;

/// First node of the IPv4 root, relative to the table's base.
pub const V4_ROOT: u32 = 0;
/// First node of the IPv6 root, relative to the table's base.
pub const V6_ROOT: u32 = 256;
/// First node the builder may allocate, relative to the table's base.
pub const FIRST_FREE: u32 = 512;

/// Looks `addr` up in the table whose nodes start at `base`.
///
/// `node(i)` returns node `i` of the whole map, or `None` when `i` is out of
/// range, which answers "deny": a corrupt table fails closed. The kernel and
/// the userspace tests run this same walk ([`lookup_by_ref`]).
#[inline(always)]
pub fn lookup<'a, const N: usize>(
    addr: &[u8; N],
    base: u32,
    node: impl Fn(u32) -> Option<&'a Node>,
) -> bool {
    lookup_by_ref(addr, base, |i: &u32| node(*i))
}

/// [`lookup`], with `node` given a reference to the index: to the cell
/// itself once past the root. The eBPF program hands that reference to the
/// map lookup as its key, so each step reads the child's index once, from the
/// table. Passing it by value copied it to the stack first and read it back,
/// a store-to-load round trip on the critical path of every step (measured:
/// about a third of a step; see BENCHMARKS.md).
#[inline(always)]
pub fn lookup_by_ref<'a, const N: usize>(
    addr: &[u8; N],
    base: u32,
    node: impl Fn(&u32) -> Option<&'a Node>,
) -> bool {
    let root = if N == 4 { V4_ROOT } else { V6_ROOT };
    let Some(first) = node(&(base + root + u32::from(addr[0]))) else {
        return false;
    };
    let mut cell = &first[usize::from(addr[1])];
    // Bounded: at most one node per remaining address byte.
    let mut i = 2;
    while i < N {
        if *cell == DENY || *cell == ALLOW {
            break;
        }
        let Some(next) = node(cell) else {
            return false;
        };
        cell = &next[usize::from(addr[i])];
        i += 1;
    }
    *cell == ALLOW
}
