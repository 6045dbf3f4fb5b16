#!/usr/bin/env python3
"""Boots the rig: Xen under qemu-system-x86_64 -accel tcg, dom0 from OUT/. Writes the serial
console to LOG with each line stamped in seconds since QEMU started, echoes the rig's own lines,
stops at `RIG-MARK all-done`, a panic or the timeout, then prints a verdict.
Exit status 0 only when every expected scenario printed RIG-PASS and nothing printed RIG-FAIL.
usage: boot.py OUT LOG TIMEOUT EXPECTED_PASS_PREFIX...
"""
import os
import re
import select
import subprocess
import sys
import time

out, log, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
expected = sys.argv[4:]
# The CPU model: `qemu64`. With `-cpu max,-smap,-smep` (the reference recipe's) the domU and
# dom0 suffered random user-memory corruption under grant traffic (busybox and our processes
# segfaulting, 64-byte garbage in read data) that vanished with the plain model; set
# XENPV_RIG_CPU to try another.
cmd = [
    "qemu-system-x86_64", "-accel", "tcg", "-cpu", os.environ.get("XENPV_RIG_CPU", "qemu64"), "-m", "2048", "-smp", "2",
    "-nographic", "-no-reboot", "-kernel", f"{out}/xen.elf",
    "-append", "console=com1 com1=115200,8n1 dom0_mem=768M,max:768M loglvl=all "
               "guest_loglvl=all noreboot bootscrub=0",
    "-initrd", f"{out}/vmlinux console=hvc0 earlyprintk=xen rig=dom0 " + os.environ.get("XENPV_RIG_DOM0_ARGS", "") + f",{out}/dom0.cpio.gz",
]
end = re.compile(rb"RIG-MARK all-done|Kernel panic|Panic on CPU|Reboot in five seconds|"
                 rb"Hardware Dom0 crashed|RIG-MARK role dom0 ended")
show = re.compile(rb"RIG-|Xen version|\(XEN\) \*\*\*|[Pp]anic|^dom0:|\[blkback\].*(ERROR|WARN)|"
                  rb"\[domU\] (RIG-|domU:)|BUG|Oops|error")
t0 = time.time()
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT)
passed, failed, ended, buf = [], [], None, b""
with open(log, "wb") as f:
    f.write(b"# " + " ".join(cmd).encode() + b"\n")
    while ended is None:
        left = timeout - (time.time() - t0)
        if left <= 0:
            ended = "timeout after %.0f s" % timeout
            break
        r, _, _ = select.select([p.stdout], [], [], min(left, 1.0))
        if not r:
            continue
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            ended = "QEMU exited (status %s)" % p.wait()
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.rstrip(b"\r")
            stamped = b"[%8.3f] " % (time.time() - t0) + line + b"\n"
            f.write(stamped)
            f.flush()
            if show.search(line):
                sys.stdout.buffer.write(stamped)
                sys.stdout.flush()
            text = line.decode("utf-8", "replace")
            if "RIG-PASS " in text:
                passed.append(text.split("RIG-PASS ", 1)[1])
            if "RIG-FAIL " in text:
                failed.append(text.split("RIG-FAIL ", 1)[1])
            if end.search(line):
                ended = line.decode("utf-8", "replace").strip()
                break
    f.write(b"# END %s after %.1f s\n" % (ended.encode(), time.time() - t0))
if p.poll() is None:
    p.kill()
    p.wait()
elapsed = time.time() - t0
missing = [e for e in expected if not any(x.startswith(e) for x in passed)]
print("\n==> rig: %s after %.1f s (serial log: %s)" % (ended, elapsed, log))
for x in passed:
    print("    pass: " + x)
for x in failed:
    print("    FAIL: " + x)
for x in missing:
    print("    FAIL: no RIG-PASS for %r" % x)
ok = not failed and not missing and "all-done" in ended
print("==> rig %s" % ("PASSED" if ok else "FAILED"))
sys.exit(0 if ok else 1)
