//! The allowlist node map, mapped into our address space.
//!
//! Writing a 100k-entry table node by node through bpf(2) takes one syscall
//! per KiB; through the mapping it is a memcpy. The map is created with
//! BPF_F_MMAPABLE by the eBPF object.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use smtpgate_common::table::Node;

pub struct NodeRegion {
    ptr: NonNull<Node>,
    nodes: usize,
}

// SAFETY: the region is plain memory shared with the kernel; access goes
// through &mut self, so one thread writes at a time.
unsafe impl Send for NodeRegion {}

impl NodeRegion {
    /// Maps `nodes` nodes of the array map behind `fd`.
    pub fn map(fd: impl AsFd, nodes: usize) -> std::io::Result<Self> {
        let len = nodes * size_of::<Node>();
        // SAFETY: a fresh shared mapping of a BPF array map fd; the kernel
        // checks that the map is mmapable and at least `len` long.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<Node>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self { ptr, nodes })
    }

    /// Nodes `start..start + len`.
    pub fn slice_mut(&mut self, start: usize, len: usize) -> &mut [Node] {
        assert!(start + len <= self.nodes, "node range out of the mapping");
        // SAFETY: in bounds (checked above) of a live mapping we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), len) }
    }
}

impl Drop for NodeRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.nodes * size_of::<Node>());
        }
    }
}
