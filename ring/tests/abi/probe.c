/* ABI probe: prints the size, alignment and field offsets of the Xen public ring, blkif and
 * netif structures as compiled by this C compiler, one "key value" pair per line.
 * Compiled by ring/tests/abi.rs against the system's libxen-dev headers, with -m64 and -m32. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/xen.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>

#define S(t) printf(#t ".size %zu\n" #t ".align %zu\n", sizeof(t), _Alignof(t))
#define F(t, f) printf(#t "." #f " %zu\n", offsetof(t, f))

int main(void) {
    S(struct blkif_request_segment);
    F(struct blkif_request_segment, gref);
    F(struct blkif_request_segment, first_sect);
    F(struct blkif_request_segment, last_sect);

    S(struct blkif_request);
    F(struct blkif_request, operation);
    F(struct blkif_request, nr_segments);
    F(struct blkif_request, handle);
    F(struct blkif_request, id);
    F(struct blkif_request, sector_number);
    F(struct blkif_request, seg);

    S(struct blkif_request_discard);
    F(struct blkif_request_discard, operation);
    F(struct blkif_request_discard, flag);
    F(struct blkif_request_discard, handle);
    F(struct blkif_request_discard, id);
    F(struct blkif_request_discard, sector_number);
    F(struct blkif_request_discard, nr_sectors);

    S(struct blkif_request_indirect);
    F(struct blkif_request_indirect, operation);
    F(struct blkif_request_indirect, indirect_op);
    F(struct blkif_request_indirect, nr_segments);
    F(struct blkif_request_indirect, id);
    F(struct blkif_request_indirect, sector_number);
    F(struct blkif_request_indirect, handle);
    F(struct blkif_request_indirect, indirect_grefs);

    S(struct blkif_response);
    F(struct blkif_response, id);
    F(struct blkif_response, operation);
    F(struct blkif_response, status);

    S(union blkif_sring_entry);
    F(struct blkif_sring, req_prod);
    F(struct blkif_sring, req_event);
    F(struct blkif_sring, rsp_prod);
    F(struct blkif_sring, rsp_event);
    F(struct blkif_sring, pvt);
    F(struct blkif_sring, ring);
    printf("blkif.ring_size.1 %u\n", (unsigned)__CONST_RING_SIZE(blkif, 4096));
    printf("blkif.ring_size.16 %u\n", (unsigned)__CONST_RING_SIZE(blkif, 16 * 4096));

    S(struct netif_tx_request);
    F(struct netif_tx_request, gref);
    F(struct netif_tx_request, offset);
    F(struct netif_tx_request, flags);
    F(struct netif_tx_request, id);
    F(struct netif_tx_request, size);

    S(struct netif_tx_response);
    F(struct netif_tx_response, id);
    F(struct netif_tx_response, status);

    S(struct netif_rx_request);
    F(struct netif_rx_request, id);
    F(struct netif_rx_request, gref);

    S(struct netif_rx_response);
    F(struct netif_rx_response, id);
    F(struct netif_rx_response, offset);
    F(struct netif_rx_response, flags);
    F(struct netif_rx_response, status);

    S(struct netif_extra_info);
    F(struct netif_extra_info, type);
    F(struct netif_extra_info, flags);
    F(struct netif_extra_info, u);
    F(struct netif_extra_info, u.gso.size);
    F(struct netif_extra_info, u.gso.type);
    F(struct netif_extra_info, u.gso.features);
    F(struct netif_extra_info, u.mcast.addr);
    F(struct netif_extra_info, u.hash.type);
    F(struct netif_extra_info, u.hash.algorithm);
    F(struct netif_extra_info, u.hash.value);

    S(struct xen_netif_ctrl_request);
    F(struct xen_netif_ctrl_request, id);
    F(struct xen_netif_ctrl_request, type);
    F(struct xen_netif_ctrl_request, data);

    S(struct xen_netif_ctrl_response);
    F(struct xen_netif_ctrl_response, id);
    F(struct xen_netif_ctrl_response, type);
    F(struct xen_netif_ctrl_response, status);
    F(struct xen_netif_ctrl_response, data);

    S(struct xen_netif_gref);
    F(struct xen_netif_gref, ref);
    F(struct xen_netif_gref, flags);
    F(struct xen_netif_gref, status);

    S(union netif_tx_sring_entry);
    S(union netif_rx_sring_entry);
    S(union xen_netif_ctrl_sring_entry);
    printf("netif_tx.ring_size.1 %u\n", (unsigned)__CONST_RING_SIZE(netif_tx, 4096));
    printf("netif_rx.ring_size.1 %u\n", (unsigned)__CONST_RING_SIZE(netif_rx, 4096));
    printf("xen_netif_ctrl.ring_size.1 %u\n", (unsigned)__CONST_RING_SIZE(xen_netif_ctrl, 4096));

    printf("BLKIF_OP_READ %d\nBLKIF_OP_WRITE %d\nBLKIF_OP_WRITE_BARRIER %d\n", BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER);
    printf("BLKIF_OP_FLUSH_DISKCACHE %d\nBLKIF_OP_RESERVED_1 %d\nBLKIF_OP_DISCARD %d\nBLKIF_OP_INDIRECT %d\n", BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_RESERVED_1, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT);
    printf("BLKIF_MAX_SEGMENTS_PER_REQUEST %d\nBLKIF_MAX_INDIRECT_PAGES_PER_REQUEST %d\n", BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    printf("NETTXF_csum_blank %u\nNETTXF_data_validated %u\nNETTXF_more_data %u\nNETTXF_extra_info %u\n", NETTXF_csum_blank, NETTXF_data_validated, NETTXF_more_data, NETTXF_extra_info);
    printf("NETRXF_data_validated %u\nNETRXF_csum_blank %u\nNETRXF_more_data %u\nNETRXF_extra_info %u\nNETRXF_gso_prefix %u\n", NETRXF_data_validated, NETRXF_csum_blank, NETRXF_more_data, NETRXF_extra_info, NETRXF_gso_prefix);
    printf("XEN_NETIF_NR_SLOTS_MIN %d\nXEN_NETIF_MAX_TX_SIZE %d\n", XEN_NETIF_NR_SLOTS_MIN, XEN_NETIF_MAX_TX_SIZE);
    return 0;
}
