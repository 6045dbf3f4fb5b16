//! Volatile access to memory another domain can write at any time.

use core::marker::PhantomData;
use core::ptr::NonNull;

use xenpv_ring::Pod;

use crate::{Error, Result};

/// A bounded view of foreign (or shared) memory, reached through copies only: no Rust reference
/// into the memory exists. Structures ([`read_obj`](Self::read_obj), [`write_obj`](Self::write_obj),
/// the `u32` accessors) and copies of up to 8 bytes use volatile accesses, once, so the compiler
/// never re-reads a value that was checked (XSA-155). Longer byte copies (payloads: sectors,
/// packets) use `memcpy`, as rust-vmm's `vm-memory` does for copies longer than a `usize`: the
/// peer may change the bytes during the copy, which garbles only data that nobody validates, and
/// a 4 KiB copy 8 bytes at a time cost blkfront a fifth of its CPU. Writes fail with
/// [`Error::ReadOnly`] on a read-only view.
#[derive(Debug, Clone, Copy)]
pub struct VolatileSlice<'a> {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    _life: PhantomData<&'a ()>,
}

// SAFETY: the slice only reaches memory through volatile accesses, which are sound from any
// thread (the memory is shared with another domain anyway).
unsafe impl Send for VolatileSlice<'_> {}
// SAFETY: as above; `&VolatileSlice` allows nothing more than `VolatileSlice`.
unsafe impl Sync for VolatileSlice<'_> {}

impl<'a> VolatileSlice<'a> {
    /// A view of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr` must be valid for volatile reads of `len` bytes (and writes, if `writable`) for
    /// `'a`, and nothing in this process may hold a Rust reference into that memory for `'a`.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize, writable: bool) -> Self {
        Self {
            ptr,
            len,
            writable,
            _life: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The start address (for system calls that take a buffer, such as `preadv`).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut u8> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: offset <= len, so the result is inside (or one past) the memory.
                Ok(unsafe { self.ptr.as_ptr().add(offset) })
            }
            _ => Err(Error::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    fn check_write(&self, offset: usize, len: usize) -> Result<*mut u8> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.check(offset, len)
    }

    /// The sub-range `offset..offset + len`.
    pub fn subslice(&self, offset: usize, len: usize) -> Result<VolatileSlice<'a>> {
        let p = self.check(offset, len)?;
        Ok(Self {
            // SAFETY: derived from a non-null pointer by an in-bounds offset.
            ptr: unsafe { NonNull::new_unchecked(p) },
            len,
            writable: self.writable,
            _life: PhantomData,
        })
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.read_with(offset, buf, bulk_copy)
    }

    /// Copies `buf.len()` bytes at `offset` into `buf` with `copy` ([`bulk_copy`] for bytes,
    /// [`volatile_copy`] for structures).
    fn read_with(&self, offset: usize, buf: &mut [u8], copy: CopyFn) -> Result<()> {
        let src = self.check(offset, buf.len())?;
        // SAFETY: `src` is valid for `buf.len()` reads (checked); `buf` is private memory.
        unsafe { copy(src, buf.as_mut_ptr(), buf.len(), true) };
        Ok(())
    }

    /// Copies `buf` to `offset` with `copy` (as [`read_with`](Self::read_with)).
    fn write_with(&self, offset: usize, buf: &[u8], copy: CopyFn) -> Result<()> {
        let dst = self.check_write(offset, buf.len())?;
        // SAFETY: `dst` is valid for `buf.len()` writes (checked); `buf` is private memory.
        unsafe { copy(buf.as_ptr(), dst, buf.len(), false) };
        Ok(())
    }

    /// Appends the `len` bytes at `offset` to `out` (one copy straight into the vector's spare
    /// capacity: no zero-filling first, as `resize` then [`read`](Self::read) would do).
    pub fn append_to(&self, offset: usize, len: usize, out: &mut Vec<u8>) -> Result<()> {
        let src = self.check(offset, len)?;
        out.reserve(len);
        let spare = out.spare_capacity_mut();
        // SAFETY: `src` is valid for `len` reads (checked); `spare` is private memory of at
        // least `len` bytes (reserved above), written here before it is counted as initialised.
        unsafe {
            bulk_copy(src, spare.as_mut_ptr().cast::<u8>(), len, true);
            out.set_len(out.len() + len);
        }
        Ok(())
    }

    /// Copies `buf` to `offset`.
    pub fn write(&self, offset: usize, buf: &[u8]) -> Result<()> {
        self.write_with(offset, buf, bulk_copy)
    }

    /// Sets `len` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        let dst = self.check_write(offset, len)?;
        for i in 0..len {
            // SAFETY: i < len and `dst` is valid for `len` writes (checked).
            unsafe { core::ptr::write_volatile(dst.add(i), byte) };
        }
        Ok(())
    }

    /// Copies `len` bytes from `self` at `src_off` to `dst` at `dst_off`, through a bounce
    /// buffer (the two may be the same foreign memory).
    pub fn copy_to(
        &self,
        src_off: usize,
        dst: &VolatileSlice<'_>,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        self.check(src_off, len)?;
        dst.check_write(dst_off, len)?;
        let mut buf = [0u8; 512];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len());
            self.read(src_off + done, &mut buf[..n])?;
            dst.write(dst_off + done, &buf[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Reads a whole `T` at `offset` exactly once (the peer may change it afterwards: validate
    /// the copy).
    pub fn read_obj<T: Pod>(&self, offset: usize) -> Result<T> {
        let mut v = xenpv_ring::zeroed::<T>();
        // SAFETY: T is Pod: its bytes may be viewed as a private byte buffer and every bit
        // pattern is a valid T.
        let bytes = unsafe {
            core::slice::from_raw_parts_mut((&mut v as *mut T).cast::<u8>(), size_of::<T>())
        };
        self.read_with(offset, bytes, volatile_copy)?;
        Ok(v)
    }

    /// Writes a whole `T` at `offset` (every byte is initialised: `T` is Pod).
    pub fn write_obj<T: Pod>(&self, offset: usize, value: T) -> Result<()> {
        // SAFETY: T is Pod (no padding), so all of its bytes are initialised.
        let bytes = unsafe {
            core::slice::from_raw_parts((&value as *const T).cast::<u8>(), size_of::<T>())
        };
        self.write_with(offset, bytes, volatile_copy)
    }

    /// Reads a little-endian `u32` at `offset`.
    pub fn read_u32(&self, offset: usize) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_with(offset, &mut b, volatile_copy)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian `u32` at `offset`.
    pub fn write_u32(&self, offset: usize, v: u32) -> Result<()> {
        self.write_with(offset, &v.to_le_bytes(), volatile_copy)
    }
}

/// A copy between shared memory and a private buffer: `(src, dst, len, shared_is_src)`.
type CopyFn = unsafe fn(*const u8, *mut u8, usize, bool);

/// Copies `len` bytes: with [`volatile_copy`] up to 8 bytes, with `memcpy` beyond (see
/// [`VolatileSlice`]).
///
/// # Safety
/// As [`volatile_copy`]; the two ranges do not overlap (one side is a private buffer).
unsafe fn bulk_copy(src: *const u8, dst: *mut u8, len: usize, shared_is_src: bool) {
    if len <= 8 {
        // SAFETY: forwarded to the caller.
        unsafe { volatile_copy(src, dst, len, shared_is_src) }
    } else {
        // SAFETY: both ranges are valid for `len` bytes (the caller's contract) and do not
        // overlap: one of them is private memory.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, len) }
    }
}

/// Copies `len` bytes with volatile accesses on the shared side: 8 bytes at a time while the
/// shared side is 8-aligned, then bytes.
///
/// # Safety
/// `src` valid for `len` reads, `dst` valid for `len` writes; the private side is a plain buffer
/// (`shared_is_src` tells which side is shared).
unsafe fn volatile_copy(src: *const u8, dst: *mut u8, len: usize, shared_is_src: bool) {
    let shared_addr = if shared_is_src {
        src as usize
    } else {
        dst as usize
    };
    let mut i = 0;
    if shared_addr % 8 == 0 {
        while i + 8 <= len {
            // SAFETY: i + 8 <= len; the shared side is 8-aligned at i, the private side is read
            // or written unaligned.
            unsafe {
                if shared_is_src {
                    let v = core::ptr::read_volatile(src.add(i).cast::<u64>());
                    core::ptr::write_unaligned(dst.add(i).cast::<u64>(), v);
                } else {
                    let v = core::ptr::read_unaligned(src.add(i).cast::<u64>());
                    core::ptr::write_volatile(dst.add(i).cast::<u64>(), v);
                }
            }
            i += 8;
        }
    }
    while i < len {
        // SAFETY: i < len.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_copies_and_objects() {
        let mut a = [0u64; 64];
        let mut b = [0u64; 64];
        let pa = NonNull::new(a.as_mut_ptr().cast::<u8>()).unwrap();
        let pb = NonNull::new(b.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: both arrays outlive the slices and are only used through them below.
        let (va, vb) = unsafe {
            (
                VolatileSlice::new(pa, 512, true),
                VolatileSlice::new(pb, 512, false),
            )
        };
        va.write(3, b"unaligned bytes, longer than eight").unwrap();
        let mut out = [0u8; 34];
        va.read(3, &mut out).unwrap();
        assert_eq!(&out, b"unaligned bytes, longer than eight");
        va.write_u32(64, 0xdead_beef).unwrap();
        assert_eq!(va.read_obj::<u32>(64).unwrap(), 0xdead_beef);
        assert!(va.read_obj::<u64>(508).is_err());
        assert!(matches!(vb.write(0, b"x"), Err(Error::ReadOnly)));
        assert!(matches!(va.copy_to(0, &vb, 0, 8), Err(Error::ReadOnly)));
        let sub = va.subslice(64, 4).unwrap();
        assert_eq!(sub.read_u32(0).unwrap(), 0xdead_beef);
        assert!(sub.read_u32(1).is_err());
        let vb2 = va.subslice(256, 256).unwrap();
        va.copy_to(0, &vb2, 0, 100).unwrap();
        let mut o = [0u8; 34];
        vb2.read(3, &mut o).unwrap();
        assert_eq!(o, out);
        let mut v = b"head".to_vec();
        va.append_to(3, 34, &mut v).unwrap();
        assert_eq!(&v[..4], b"head");
        assert_eq!(&v[4..], b"unaligned bytes, longer than eight");
        assert!(va.append_to(500, 13, &mut v).is_err());
        assert_eq!(v.len(), 38);
        va.fill(0, 512, 0xaa).unwrap();
        assert_eq!(va.read_u32(508).unwrap(), 0xaaaa_aaaa);
        assert!(va.fill(1, 512, 0).is_err());
    }
}
