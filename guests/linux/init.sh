#!/bin/sh
# Reference initramfs init for pytest-microvm's Linux guest.
#   microvm.modules=a,b   load these modules (and their dependencies) from /lib/modules
#   microvm.agent=DEV     serve the exec agent (MicroVM.run(); pytest_microvm/agent.py) on
#                         DEV: ttyS0, hvc0, vport0p1 or any /dev path.  hvc* and vport*
#                         load virtio_mmio and virtio_console first.  A dedicated port is
#                         best; on the console port add `quiet`, as kernel messages may
#                         garble a frame (the host then ignores it).  QEMU's virtconsole
#                         (hvc) drops output its host side cannot take at once; a
#                         virtserialport (vport) is flow-controlled.
#   microvm.cmd=...       run this shell command (use \x20 for spaces), then end the VM
#                         with its exit status through the debug-exit port
#   (agent and cmd)       the agent serves in the background while the command runs
#   (agent only)          the agent serves until its device closes, then power off
#   (neither)             print the ready marker and power off
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "microvm-initramfs: kernel $(uname -r)"
for word in $(cat /proc/cmdline); do
    case "$word" in
        microvm.modules=*) mods="${word#microvm.modules=}" ;;
        microvm.cmd=*) cmd="${word#microvm.cmd=}" ;;
        microvm.agent=*) agent="${word#microvm.agent=}" ;;
    esac
done
if [ -n "${agent:-}" ]; then
    case "$agent" in /*) ;; *) agent="/dev/$agent" ;; esac
    case "$agent" in /dev/hvc*|/dev/vport*) mods="${mods:+$mods,}virtio_mmio,virtio_console" ;; esac
fi
for m in $(echo "${mods:-}" | tr ',' ' '); do
    for dep in $(cat "/lib/modules/$m.order" 2>/dev/null) "$m"; do
        grep -q "^${dep} " /proc/modules 2>/dev/null && continue
        insmod "/lib/modules/$dep.ko" && echo "microvm-initramfs: loaded $dep"
    done
done
if [ -n "${agent:-}" ]; then
    # devtmpfs creates a driver's nodes asynchronously: give it up to 5 s.
    tries=0
    while [ ! -e "$agent" ] && [ "$tries" -lt 50 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    [ -e "$agent" ] || echo "microvm-initramfs: $agent does not exist; the exec agent cannot start"
fi
echo "MICROVM-INITRAMFS-READY"
if [ -n "${cmd:-}" ]; then
    [ -n "${agent:-}" ] && /bin/microvm-agent "$agent" &
    cmd=$(printf '%b' "$cmd")
    sh -c "$cmd"
    /bin/microvm-exit $?
fi
if [ -n "${agent:-}" ]; then
    /bin/microvm-agent "$agent"
    echo "microvm-initramfs: the exec agent exited (status $?)"
fi
poweroff -f
