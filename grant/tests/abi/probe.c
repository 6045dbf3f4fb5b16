/* ABI probe for the Linux grant devices: prints the size and field offsets of the gntdev and
 * gntalloc ioctl structures and the ioctl numbers, as compiled against the system's
 * linux-libc-dev headers, one "key value" pair per line. Compiled by grant/tests/abi.rs. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
typedef uint32_t grant_ref_t;
typedef uint16_t domid_t;
#include <xen/gntdev.h>
#include <xen/gntalloc.h>

#define S(t) printf(#t ".size %zu\n", sizeof(struct t))
#define F(t, f) printf(#t "." #f " %zu\n", offsetof(struct t, f))
#define C(c) printf(#c " %lu\n", (unsigned long)(c))

int main(void) {
    S(ioctl_gntdev_grant_ref);
    F(ioctl_gntdev_grant_ref, domid);
    F(ioctl_gntdev_grant_ref, ref);
    S(ioctl_gntdev_map_grant_ref);
    F(ioctl_gntdev_map_grant_ref, count);
    F(ioctl_gntdev_map_grant_ref, pad);
    F(ioctl_gntdev_map_grant_ref, index);
    F(ioctl_gntdev_map_grant_ref, refs);
    S(ioctl_gntdev_unmap_grant_ref);
    F(ioctl_gntdev_unmap_grant_ref, index);
    F(ioctl_gntdev_unmap_grant_ref, count);
    S(ioctl_gntdev_set_max_grants);
    S(ioctl_gntdev_unmap_notify);
    F(ioctl_gntdev_unmap_notify, index);
    F(ioctl_gntdev_unmap_notify, action);
    F(ioctl_gntdev_unmap_notify, event_channel_port);
    S(gntdev_grant_copy_segment);
    F(gntdev_grant_copy_segment, source);
    F(gntdev_grant_copy_segment, source.foreign.ref);
    F(gntdev_grant_copy_segment, source.foreign.offset);
    F(gntdev_grant_copy_segment, source.foreign.domid);
    F(gntdev_grant_copy_segment, dest);
    F(gntdev_grant_copy_segment, len);
    F(gntdev_grant_copy_segment, flags);
    F(gntdev_grant_copy_segment, status);
    S(ioctl_gntdev_grant_copy);
    F(ioctl_gntdev_grant_copy, count);
    F(ioctl_gntdev_grant_copy, segments);
    S(ioctl_gntalloc_alloc_gref);
    F(ioctl_gntalloc_alloc_gref, domid);
    F(ioctl_gntalloc_alloc_gref, flags);
    F(ioctl_gntalloc_alloc_gref, count);
    F(ioctl_gntalloc_alloc_gref, index);
    F(ioctl_gntalloc_alloc_gref, gref_ids);
    S(ioctl_gntalloc_dealloc_gref);
    F(ioctl_gntalloc_dealloc_gref, index);
    F(ioctl_gntalloc_dealloc_gref, count);
    S(ioctl_gntalloc_unmap_notify);
    F(ioctl_gntalloc_unmap_notify, action);

    C(IOCTL_GNTDEV_MAP_GRANT_REF);
    C(IOCTL_GNTDEV_UNMAP_GRANT_REF);
    C(IOCTL_GNTDEV_SET_MAX_GRANTS);
    C(IOCTL_GNTDEV_SET_UNMAP_NOTIFY);
    C(IOCTL_GNTDEV_GRANT_COPY);
    C(IOCTL_GNTALLOC_ALLOC_GREF);
    C(IOCTL_GNTALLOC_DEALLOC_GREF);
    C(IOCTL_GNTALLOC_SET_UNMAP_NOTIFY);
    C(UNMAP_NOTIFY_CLEAR_BYTE);
    C(UNMAP_NOTIFY_SEND_EVENT);
    C(GNTALLOC_FLAG_WRITABLE);
    return 0;
}
