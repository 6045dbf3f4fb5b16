//! Plain-old-data wire types and the layout assertions that prove them.

/// A wire type that can be copied to and from shared memory byte for byte.
///
/// # Safety
/// Implementors must be `#[repr(C)]` (or `#[repr(C, packed(N))]`) structs made only of integers,
/// arrays of integers and other `Pod` types, with **no padding bytes** (every byte is a field, so a
/// value written to shared memory has every byte initialised, XSA-216) and no invalid bit
/// patterns (so a value read from a hostile peer is always valid). The crate's `wire_layout!` macro
/// implements this trait only after proving, at compile time, that the field sizes add up to the
/// struct size.
pub unsafe trait Pod: Copy + 'static {}

/// A value of `T` with every byte zero.
pub fn zeroed<T: Pod>() -> T {
    // SAFETY: `T: Pod` has no invalid bit patterns, so all-zero bytes are a valid `T`.
    unsafe { core::mem::zeroed() }
}

/// Reinterprets the first `size_of::<B>()` bytes of `a` as a `B`, as C code does with the
/// members of a ring entry union (a blkif slot read as a discard or indirect request, a netif tx
/// slot read as extra info). `B` must not be larger than `A` (checked at compile time).
pub fn cast<A: Pod, B: Pod>(a: &A) -> B {
    const {
        assert!(core::mem::size_of::<B>() <= core::mem::size_of::<A>());
    }
    // SAFETY: `a` is valid for reads of `size_of::<A>() >= size_of::<B>()` bytes; both types are
    // `Pod` (every byte initialised, every bit pattern valid); `read_unaligned` needs no
    // alignment.
    unsafe { core::ptr::read_unaligned((a as *const A).cast::<B>()) }
}

/// Widens `b` into an `A` whose first bytes are `b` and whose remaining bytes are zero.
pub(crate) fn widen<B: Pod, A: Pod>(b: &B) -> A {
    const {
        assert!(core::mem::size_of::<B>() <= core::mem::size_of::<A>());
    }
    let mut a = zeroed::<A>();
    // SAFETY: `a` is a local valid for writes of `size_of::<A>() >= size_of::<B>()` bytes;
    // `write_unaligned` needs no alignment; both types are `Pod`, so the result is a valid `A`.
    unsafe { core::ptr::write_unaligned((&mut a as *mut A).cast::<B>(), *b) };
    a
}

/// The size of the field a projection closure reaches; used by [`wire_layout!`].
#[doc(hidden)]
pub const fn field_size<T, F>(_projection: fn(*const T) -> *const F) -> usize {
    core::mem::size_of::<F>()
}

/// Asserts at compile time the size, alignment and every field offset of a wire struct, proves
/// it has no padding (the field sizes add up to its size) and implements [`Pod`] for it.
macro_rules! wire_layout {
    ($t:ty, size $size:expr, align $align:expr, { $($field:ident @ $off:expr),+ $(,)? }) => {
        const _: () = {
            assert!(core::mem::size_of::<$t>() == $size, "size");
            assert!(core::mem::align_of::<$t>() == $align, "align");
            $( assert!(core::mem::offset_of!($t, $field) == $off, stringify!($field)); )+
            assert!(
                0 $( + $crate::pod::field_size(|v: *const $t| {
                    // SAFETY: never called: the closure only names the field's type.
                    unsafe { core::ptr::addr_of!((*v).$field) }
                }) )+ == $size,
                "padding"
            );
        };
        // SAFETY: the assertions above prove the struct has no padding; its fields are integers,
        // arrays of integers or `Pod` types (see the struct definition), so every bit pattern is
        // valid.
        unsafe impl $crate::pod::Pod for $t {}
    };
}
pub(crate) use wire_layout;

// SAFETY: integers have no padding and no invalid bit patterns.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl Pod for u16 {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: arrays of `Pod` have no padding between elements and no invalid bit patterns.
unsafe impl<T: Pod, const N: usize> Pod for [T; N] {}
