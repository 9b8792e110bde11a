/* Holds one idle KVM VM (in-kernel irqchip, one vCPU that never runs) for as
 * long as the lab host (L2) is up, so that starting and stopping the guests'
 * VMs never live-patches L2's kernel code.
 *
 * Why: KVM flips static keys when its VM count goes from 0 to 1 and back:
 * kvm_create_vm() and kvm_destroy_vm() take and drop preempt_notifier_key,
 * tested in __schedule (in the lab's kernel at __schedule+0x2ab: a 5-byte NOP
 * without a VM, a JMP with one), and a vCPU's LAPIC holds apic_sw_disabled
 * until its guest enables it. Linux flips a key with text_poke_bp(): an INT3
 * on the site, the new instruction, the INT3 removed, while the other CPUs run
 * that code. Under QEMU 7.2 TCG with two vCPUs, L2 once hung for good as the
 * 26th guest of a run started: both L2 CPUs took that INT3 at __schedule+0x2ab
 * again and again, interrupts off, while L2's RAM there already held the JMP;
 * TCG kept executing a stale translation of the patched code. With one VM
 * always held, the keys stay on and the guests' VMs patch nothing.
 *
 *   labkvmhold      create the VM, print "LAB-KVM-HOLD ok", sleep forever */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void) {
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { perror("labkvmhold: /dev/kvm"); return 1; }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) { perror("labkvmhold: KVM_CREATE_VM"); return 1; }
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) { perror("labkvmhold: KVM_CREATE_IRQCHIP"); return 1; }
    if (ioctl(vm, KVM_CREATE_VCPU, 0) < 0) { perror("labkvmhold: KVM_CREATE_VCPU"); return 1; }
    printf("LAB-KVM-HOLD ok\n");
    fflush(stdout);
    for (;;) pause();
}
