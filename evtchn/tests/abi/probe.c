/* ABI probe: prints the ioctl numbers and argument struct sizes of Linux's /dev/xen/evtchn
 * interface (linux-libc-dev's <xen/evtchn.h>), one "key value" pair per line.
 * Compiled by evtchn/tests/abi.rs. <xen/xen.h> (libxen-dev) provides domid_t. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/event_channel.h>
#include <xen/evtchn.h>

#define S(t) printf(#t ".size %zu\n" #t ".align %zu\n", sizeof(t), _Alignof(t))
#define F(t, f) printf(#t "." #f " %zu\n", offsetof(t, f))
#define C(n) printf(#n " %lu\n", (unsigned long)(n))

int main(void) {
    S(struct ioctl_evtchn_bind_virq);
    F(struct ioctl_evtchn_bind_virq, virq);
    S(struct ioctl_evtchn_bind_interdomain);
    F(struct ioctl_evtchn_bind_interdomain, remote_domain);
    F(struct ioctl_evtchn_bind_interdomain, remote_port);
    S(struct ioctl_evtchn_bind_unbound_port);
    F(struct ioctl_evtchn_bind_unbound_port, remote_domain);
    S(struct ioctl_evtchn_unbind);
    F(struct ioctl_evtchn_unbind, port);
    S(struct ioctl_evtchn_notify);
    F(struct ioctl_evtchn_notify, port);
    S(struct ioctl_evtchn_restrict_domid);
    F(struct ioctl_evtchn_restrict_domid, domid);
    C(IOCTL_EVTCHN_BIND_VIRQ);
    C(IOCTL_EVTCHN_BIND_INTERDOMAIN);
    C(IOCTL_EVTCHN_BIND_UNBOUND_PORT);
    C(IOCTL_EVTCHN_UNBIND);
    C(IOCTL_EVTCHN_NOTIFY);
    C(IOCTL_EVTCHN_RESET);
    C(IOCTL_EVTCHN_RESTRICT_DOMID);
    C(DOMID_SELF);
    printf("evtchn_port_t.size %zu\n", sizeof(evtchn_port_t));
    printf("domid_t.size %zu\n", sizeof(domid_t));
    return 0;
}
