#!/bin/sh
# Reference initramfs init for pytest-microvm's Linux guest.
#   microvm.modules=a,b   load these modules (and their dependencies) from /lib/modules
#   microvm.cmd=...       run this shell command (use \x20 for spaces), then end the VM
#                         with its exit status through the debug-exit port
#   (neither)             print the ready marker and power off
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "microvm-initramfs: kernel $(uname -r)"
for word in $(cat /proc/cmdline); do
    case "$word" in
        microvm.modules=*) mods="${word#microvm.modules=}" ;;
        microvm.cmd=*) cmd="${word#microvm.cmd=}" ;;
    esac
done
for m in $(echo "${mods:-}" | tr ',' ' '); do
    for dep in $(cat "/lib/modules/$m.order" 2>/dev/null) "$m"; do
        grep -q "^${dep} " /proc/modules 2>/dev/null && continue
        insmod "/lib/modules/$dep.ko" && echo "microvm-initramfs: loaded $dep"
    done
done
echo "MICROVM-INITRAMFS-READY"
if [ -n "${cmd:-}" ]; then
    cmd=$(printf '%b' "$cmd")
    sh -c "$cmd"
    /bin/microvm-exit $?
fi
poweroff -f
