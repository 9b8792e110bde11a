//! Tiny hand-assembled test guests, packed as PVH-bootable ELF64 images.
//!
//! The guests are what `/dev/kvm` on the test machines can run (see LAB.md): 32-bit
//! protected-mode code with flat segments and paging off, entered through the PVH
//! ABI (Xen ELF note `XEN_ELFNOTE_PHYS32_ENTRY`). They talk to the machine only by
//! port I/O: the 16550 UART at 0x3f8 (SPEC.md "Guest-visible machine") and the ACPI
//! sleep/reset port at 0x600. They never `hlt`: with an in-kernel irqchip a halt never
//! reaches userspace, so a halted guest could not be told apart from a hung VMM.
//!
//! No assembler runs at test time: the machine code below is encoded by hand, one
//! instruction per line with its mnemonic beside it, and only branch displacements
//! are computed (by `Asm`). The same images boot under `qemu-system-x86_64 -kernel`,
//! which is how they were checked independently of molt.
//!
//! Guest-physical layout (one PT_LOAD segment of `SEGMENT_SIZE` bytes at 1 MiB):
//!
//! | address    | what                                             |
//! |------------|--------------------------------------------------|
//! | 0x100000   | code, entry point                                |
//! | 0x100200   | strings (NUL-terminated)                         |
//! | 0x100400   | `COUNTER_ADDR`: the counting guest's u32 counter |
//! | 0x100600   | the suspend guest's wake code                    |
//! | 0x100800   | the PVH ELF note (also covered by the PT_NOTE)   |
//! | ..0x101000 | stack, growing down from `STACK_TOP`             |

use std::fs;
use std::path::{Path, PathBuf};

/// Guest-physical address of the loaded segment, and of the entry point.
pub const LOAD_ADDR: u32 = 0x10_0000;
/// Size of the loaded segment (file size == memory size: nothing relies on zeroing).
pub const SEGMENT_SIZE: u32 = 0x1000;
/// Where the counting guest keeps its counter (little-endian u32, starts at 0).
pub const COUNTER_ADDR: u32 = LOAD_ADDR + 0x400;
/// Initial stack pointer: the top of the loaded segment.
pub const STACK_TOP: u32 = LOAD_ADDR + SEGMENT_SIZE;
/// The counting guest prints a line every 2^COUNT_SHIFT counter increments.
///
/// Pacing is by I/O exits, not by instruction count: on this machine's paravirtual
/// KVM the tiny guests' instructions are emulated (about 1.5-2 million a second, a
/// thousand times slower than native), while a port-I/O exit costs about 5-10 us
/// here and a few us on a native KVM. So each increment is preceded by one read of
/// the UART's line status register, and the line rate stays within a small factor
/// everywhere: measured ~8 ms a line on the PVM /dev/kvm (one guest alone), where a
/// pure busy-wait of 2^24 cycles took 20 s a line.
pub const COUNT_SHIFT: u32 = 10;
/// Difference between two consecutive `count=` values: a line is printed exactly when
/// the counter reaches a multiple of this, so the printed values step by it. The u32
/// counter wraps only after 2^32 increments: hours of run time at any of these rates.
pub const COUNT_STEP: u32 = 1 << COUNT_SHIFT;

/// The first line every guest prints.
pub const START_LINE: &str = "molt-guest: start";
/// The line the exit guest prints before powering off or resetting.
pub const HELLO_LINE: &str = "molt-guest: hello";
/// The line the suspend guest prints before it asks for S3.
pub const SUSPEND_LINE: &str = "molt-guest: suspending";
/// The line the suspend guest prints if its sleep command returns with WAK_STS
/// set: it woke where it slept instead of at its waking vector.
pub const IN_PLACE_LINE: &str = "molt-guest: woke in place";

/// Port of the 16550 transmit holding register (COM1).
const UART_THR: u32 = 0x3f8;
/// Port of the 16550 line status register; bit 5 = transmit holding register empty.
const UART_LSR: u32 = 0x3fd;
/// PCI configuration mechanism 1: address and data ports.
const PCI_CONFIG_ADDRESS: u32 = 0xcf8;
const PCI_CONFIG_DATA: u32 = 0xcfc;
/// Offset of the virtio notification region in molt's virtio-pci BAR 0 (queue 0's
/// doorbell is its first word).
const NOTIFY_OFFSET: u32 = 0x3000;
/// molt's ACPI reset port, once also its (hardware-reduced) sleep port.
const ACPI_SLEEP_PORT: u32 = 0x600;
/// SLP_TYP=5 (S5) | SLP_EN, written to the old sleep port: power off.
const ACPI_POWER_OFF: u8 = 0x34;
/// molt's PM1a status register (WAK_STS is bit 15) and control register.
const PM1_STATUS_PORT: u32 = 0x604;
const PM1_CONTROL_PORT: u32 = 0x608;
/// SLP_TYP << 10 | SLP_EN, written to PM1a control: S3 (suspend), S5 (off).
const PM1_S3: u16 = 3 << 10 | 1 << 13;
const PM1_S5: u16 = 5 << 10 | 1 << 13;
/// molt's FACS (its `layout::ACPI_FACS_START`) and the fields the guest
/// writes: Firmware_Waking_Vector, X_Firmware_Waking_Vector, OSPM flags
/// (ACPI 6.5 table 5.14).
const FACS_ADDR: u32 = 0xe0040;
const FACS_WAKING_VECTOR: u32 = FACS_ADDR + 12;
const FACS_X_WAKING_VECTOR: u32 = FACS_ADDR + 24;
const FACS_OSPM_FLAGS: u32 = FACS_ADDR + 36;
/// Where the suspend guest's wake code lies in its segment.
const WAKE_CODE_ADDR: u32 = LOAD_ADDR + 0x600;
/// Where a real-mode wake code is copied (real mode reaches only the first
/// MiB): at an offset within its paragraph, so CS:IP is 0800:0003.
pub const REAL_MODE_VECTOR: u32 = 0x8003;
/// Written to the sleep port: reset (the FADT reset value).
const ACPI_RESET: u8 = 0x01;
/// Bounded LSR polls before a byte is written anyway: a VMM that never reports the
/// transmitter empty makes the guest slow, not stuck.
const LSR_POLLS: u32 = 1000;

const MSG_START_ADDR: u32 = LOAD_ADDR + 0x200;
const MSG_HELLO_ADDR: u32 = LOAD_ADDR + 0x220;
const MSG_COUNT_ADDR: u32 = LOAD_ADDR + 0x240;
const MSG_SUSPEND_ADDR: u32 = LOAD_ADDR + 0x260;
const MSG_IN_PLACE_ADDR: u32 = LOAD_ADDR + 0x280;
const NOTE_ADDR: u32 = LOAD_ADDR + 0x800;
/// Code must end before the first string.
const CODE_LIMIT: u32 = MSG_START_ADDR - LOAD_ADDR;

// ELF constants (see the System V gABI and the x86-64 psABI).
const ELF_HEADER_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// File offset of the loaded segment: page-aligned, as linkers do it.
const SEGMENT_FILE_OFFSET: usize = 0x1000;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;
/// Xen's PVH entry note: desc is the 32-bit physical entry address.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Note header (12 bytes) + "Xen\0" + 4-byte desc.
const NOTE_SIZE: usize = 20;

/// How the exit guest ends the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Write 0x34 (S5 | SLP_EN) to port 0x600.
    PowerOff,
    /// Write 0x01 (the FADT reset value) to port 0x600.
    Reset,
}

/// A guest that prints `molt-guest: start`, then forever increments the u32 at
/// `COUNTER_ADDR` (each increment paced by one UART status read) and, each time the counter
/// is a multiple of `COUNT_STEP`, prints `count=XXXXXXXX` with the counter's value
/// read back from RAM in 8 uppercase hex digits. A guest restored with its RAM
/// continues the sequence; one that restarted would print the start line again.
pub fn counting_guest() -> Vec<u8> {
    let mut a = entry(MSG_START_ADDR);

    a.label("main_loop");
    a.emit_u32(&[0xba], UART_LSR); // mov edx, 0x3fd
    a.emit(&[0xec]); // in al, dx (pacing: one I/O exit per increment, result unused)
    a.emit_u32(&[0xff, 0x05], COUNTER_ADDR); // inc dword [COUNTER]
    a.emit_u32(&[0xf7, 0x05], COUNTER_ADDR); // test dword [COUNTER], COUNT_STEP - 1 ...
    a.emit(&(COUNT_STEP - 1).to_le_bytes()); // ... (imm32 of the test above)
    a.rel8(0x75, "main_loop"); // jnz main_loop

    a.emit_u32(&[0xbb], MSG_COUNT_ADDR); // mov ebx, MSG_COUNT ("count=")
    a.rel32(&[0xe8], "puts"); // call puts
    a.emit_u32(&[0x8b, 0x35], COUNTER_ADDR); // mov esi, [COUNTER]
    a.emit_u32(&[0xbf], 8); // mov edi, 8 (hex digits left)
    a.label("hex_digit");
    a.emit(&[0xc1, 0xc6, 0x04]); // rol esi, 4 (next nibble, most significant first)
    a.emit(&[0x89, 0xf0]); // mov eax, esi
    a.emit(&[0x24, 0x0f]); // and al, 0x0f
    a.emit(&[0x3c, 0x0a]); // cmp al, 10
    a.rel8(0x72, "decimal"); // jb decimal
    a.emit(&[0x04, 0x07]); // add al, 'A' - '0' - 10
    a.label("decimal");
    a.emit(&[0x04, b'0']); // add al, '0'
    a.rel32(&[0xe8], "putc"); // call putc
    a.emit(&[0x4f]); // dec edi
    a.rel8(0x75, "hex_digit"); // jnz hex_digit
    a.emit(&[0xb0, b'\n']); // mov al, '\n'
    a.rel32(&[0xe8], "putc"); // call putc
    a.rel32(&[0xe9], "main_loop"); // jmp main_loop

    emit_serial_routines(&mut a);
    build_elf(a.finish(), &[])
}

/// A guest that prints `molt-guest: hello`, then powers off or resets the VM through
/// port 0x600, then spins (`jmp $`) in case the write returns.
pub fn exit_guest(kind: ExitKind) -> Vec<u8> {
    let value = match kind {
        ExitKind::PowerOff => ACPI_POWER_OFF,
        ExitKind::Reset => ACPI_RESET,
    };
    let mut a = entry(MSG_HELLO_ADDR);
    a.emit_u32(&[0xba], ACPI_SLEEP_PORT); // mov edx, 0x600
    a.emit(&[0xb0, value]); // mov al, 0x34 (power off) or 0x01 (reset)
    a.emit(&[0xee]); // out dx, al
    a.label("spin");
    a.rel8(0xeb, "spin"); // jmp $

    emit_serial_routines(&mut a);
    build_elf(a.finish(), &[])
}

/// Where the suspend guest asks to be woken: the FACS field it fills in, and
/// how its wake code checks it runs in the mode that field asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Firmware_Waking_Vector = `REAL_MODE_VECTOR`, the wake code copied there.
    RealMode,
    /// X_Firmware_Waking_Vector = the wake code, 64BIT_WAKE_F clear.
    Protected,
    /// X_Firmware_Waking_Vector = the wake code, 64BIT_WAKE_F set.
    Long,
    /// Firmware_Waking_Vector = this raw value and no wake code: what molt must
    /// refuse (0: no vector at all).
    Vector(u32),
    /// X_Firmware_Waking_Vector = this raw value (64BIT_WAKE_F clear), no wake code.
    XVector(u64),
}

impl Wake {
    /// The line the wake code prints.
    pub fn woken_line(self) -> &'static str {
        match self {
            Wake::RealMode => "molt-guest: woken in real mode",
            Wake::Protected => "molt-guest: woken in 32-bit mode",
            Wake::Long => "molt-guest: woken in 64-bit mode",
            Wake::Vector(_) | Wake::XVector(_) => "",
        }
    }
}

/// A guest that suspends to RAM the way Linux does: it prints
/// `molt-guest: start`, writes its waking vector into the FACS as `wake`
/// says, prints `molt-guest: suspending`, writes S3 | SLP_EN to PM1a control,
/// and polls WAK_STS as ACPICA does. If the sleep command returns (WAK_STS
/// set) it prints `IN_PLACE_LINE` and spins. Woken at its vector, the wake
/// code prints `wake.woken_line()` and powers off (S5 through PM1a control).
///
/// Each wake code first proves its mode with an instruction another mode
/// decodes differently, and spins (prints nothing) if the mode is wrong: `mov
/// ax, imm16` (`66 b8` in 32-bit code, `b8` in 16-bit code) takes two more
/// bytes in the other width, swallowing a `jmp +2` over a `jmp $`; in 32-bit
/// code `40` is `inc eax`, in 64-bit code a REX prefix; and 64-bit code's
/// `mov rax, imm64` is `dec eax; mov eax, imm32` and then a `jmp $` in 32-bit
/// code.
pub fn suspend_guest(wake: Wake) -> Vec<u8> {
    let mut a = entry(MSG_START_ADDR);
    let store = |a: &mut Asm, addr: u32, v: u32| {
        a.emit_u32(&[0xc7, 0x05], addr); // mov dword [addr], imm32
        a.emit(&v.to_le_bytes());
    };
    let code = wake_code(wake);
    match wake {
        Wake::RealMode => {
            a.emit_u32(&[0xbe], WAKE_CODE_ADDR); // mov esi, wake code
            a.emit_u32(&[0xbf], REAL_MODE_VECTOR); // mov edi, vector
            a.emit_u32(&[0xb9], code.len() as u32); // mov ecx, its length
            a.emit(&[0xfc]); // cld
            a.emit(&[0xf3, 0xa4]); // rep movsb
            store(&mut a, FACS_WAKING_VECTOR, REAL_MODE_VECTOR);
        }
        Wake::Protected | Wake::Long => {
            store(&mut a, FACS_X_WAKING_VECTOR, WAKE_CODE_ADDR);
            store(&mut a, FACS_X_WAKING_VECTOR + 4, 0);
            store(&mut a, FACS_OSPM_FLAGS, u32::from(wake == Wake::Long));
        }
        Wake::Vector(v) => store(&mut a, FACS_WAKING_VECTOR, v),
        Wake::XVector(v) => {
            store(&mut a, FACS_X_WAKING_VECTOR, v as u32);
            store(&mut a, FACS_X_WAKING_VECTOR + 4, (v >> 32) as u32);
        }
    }
    a.emit_u32(&[0xbb], MSG_SUSPEND_ADDR); // mov ebx, MSG_SUSPEND
    a.rel32(&[0xe8], "puts"); // call puts
    a.emit_u32(&[0xba], PM1_CONTROL_PORT); // mov edx, PM1a control
    a.emit(&[0x66, 0xb8]); // mov ax, S3 | SLP_EN ...
    a.emit(&PM1_S3.to_le_bytes()); // ... (its imm16)
    a.emit(&[0x66, 0xef]); // out dx, ax
    a.emit_u32(&[0xba], PM1_STATUS_PORT); // mov edx, PM1a status
    a.label("poll");
    a.emit(&[0x66, 0xed]); // in ax, dx
    a.emit(&[0xf6, 0xc4, 0x80]); // test ah, 0x80 (WAK_STS)
    a.rel8(0x74, "poll"); // jz poll
    a.emit_u32(&[0xbb], MSG_IN_PLACE_ADDR); // mov ebx, MSG_IN_PLACE
    a.rel32(&[0xe8], "puts"); // call puts
    a.label("spin");
    a.rel8(0xeb, "spin"); // jmp $

    emit_serial_routines(&mut a);
    build_elf(a.finish(), &code)
}

/// The wake code for `wake` (position-independent: it only does port I/O).
fn wake_code(wake: Wake) -> Vec<u8> {
    let line = format!("{}\n", wake.woken_line());
    let mut c = Vec::new();
    let sixteen = wake == Wake::RealMode;
    match wake {
        Wake::RealMode => c.extend([0xb8, 0x34, 0x12]), // mov ax, 0x1234 (16-bit)
        Wake::Protected => {
            c.extend([0x31, 0xc0]); // xor eax, eax
            c.extend([0x40, 0x90]); // inc eax; nop (REX nop in 64-bit code)
            c.extend([0x85, 0xc0, 0x74, 0xfe]); // test eax, eax; jz $
            c.extend([0x66, 0xb8, 0x34, 0x12]); // mov ax, 0x1234 (32-bit)
        }
        Wake::Long => {
            c.extend([0x48, 0xb8, 0, 0, 0, 0, 0xeb, 0xfe, 0xeb, 0xfe]); // mov rax, imm64
        }
        Wake::Vector(_) | Wake::XVector(_) => return Vec::new(),
    }
    c.extend([0xeb, 0x02, 0xeb, 0xfe]); // jmp +2; jmp $ (the wrong width lands here)
                                        // mov dx/edx, port: `ba` and an immediate of the code's width.
    let port = |c: &mut Vec<u8>, p: u32| {
        c.push(0xba);
        if sixteen {
            c.extend((p as u16).to_le_bytes());
        } else {
            c.extend(p.to_le_bytes());
        }
    };
    port(&mut c, UART_THR);
    for b in line.bytes() {
        c.extend([0xb0, b, 0xee]); // mov al, byte; out dx, al
    }
    port(&mut c, PM1_CONTROL_PORT);
    // mov ax, S5 | SLP_EN; out dx, ax (the operand-size prefix outside 16-bit code).
    if !sixteen {
        c.push(0x66);
    }
    c.push(0xb8);
    c.extend(PM1_S5.to_le_bytes());
    if !sixteen {
        c.push(0x66);
    }
    c.push(0xef);
    c.extend([0xeb, 0xfe]); // jmp $
    c
}

/// Bytes of each read the storm guest queues: `MAX_REQUEST_BYTES`, the most molt
/// takes in one virtio-blk request (254 segments of 128 KiB).
pub const STORM_READ_BYTES: u32 = 254 << 17;
/// Reads the storm guest keeps queued.
pub const STORM_QUEUED: u32 = 200;
/// The storm guest's disk must hold at least one read.
pub const STORM_DISK_BYTES: u64 = 64 << 20;
/// Guest RAM the storm guest needs (its read buffer ends at 36 MiB).
pub const STORM_MEM: &str = "64M";

/// Writes the storm guest and its sparse disk image into `dir`; returns their paths.
pub fn storm_files(dir: &Path) -> (PathBuf, PathBuf) {
    let kernel = write_guest(dir, "storm.elf", &storm_guest());
    let disk = dir.join("disk.img");
    fs::File::create(&disk)
        .and_then(|f| f.set_len(STORM_DISK_BYTES))
        .expect("create the sparse disk image");
    (kernel, disk)
}

/// A guest that keeps its virtio-blk disk busy, as a misbehaving guest would: it
/// drives the function in PCI slot 1 (the first `--disk`) by hand, with no
/// interrupts - memory decoding on, BAR 0 read from config space, VERSION_1 only,
/// queue 0 in RAM at 2 MiB - and then forever keeps `STORM_QUEUED` reads of
/// `STORM_READ_BYTES` from sector 0 outstanding: each time round its loop it sets
/// the avail index to the used index plus `STORM_QUEUED` and kicks, so the avail
/// index moves whenever a read completes. All the reads share one descriptor chain
/// (header, data, status) and head 0: the device does not care, and RAM starts
/// zeroed, so the avail ring already holds head 0 everywhere and the header says
/// VIRTIO_BLK_T_IN of sector 0.
pub fn storm_guest() -> Vec<u8> {
    const DESC: u32 = 0x20_0000;
    const AVAIL: u32 = 0x20_1000;
    const USED: u32 = 0x20_2000;
    const HDR: u32 = 0x20_3000;
    const STATUS: u32 = 0x20_3100;
    const DATA: u32 = 0x40_0000;
    /// Config mechanism 1 address of bus 0, slot 1, function 0, at `reg`.
    const fn slot1(reg: u32) -> u32 {
        0x8000_0000 | 1 << 11 | reg
    }
    // mov dword [addr], imm32
    let store = |a: &mut Asm, addr: u32, v: u32| {
        a.emit_u32(&[0xc7, 0x05], addr);
        a.emit(&v.to_le_bytes());
    };
    // mov byte/word/dword [ebx + off], imm: virtio common configuration registers.
    let reg8 = |a: &mut Asm, off: u32, v: u8| {
        a.emit_u32(&[0xc6, 0x83], off);
        a.emit(&[v]);
    };
    let reg16 = |a: &mut Asm, off: u32, v: u16| {
        a.emit_u32(&[0x66, 0xc7, 0x83], off);
        a.emit(&v.to_le_bytes());
    };
    let reg32 = |a: &mut Asm, off: u32, v: u32| {
        a.emit_u32(&[0xc7, 0x83], off);
        a.emit(&v.to_le_bytes());
    };
    let mut a = entry(MSG_START_ADDR);

    a.emit_u32(&[0xba], PCI_CONFIG_ADDRESS); // mov edx, 0xcf8
    a.emit_u32(&[0xb8], slot1(0x04)); // mov eax, slot 1 command register
    a.emit(&[0xef]); // out dx, eax
    a.emit_u32(&[0xba], PCI_CONFIG_DATA); // mov edx, 0xcfc
    a.emit_u32(&[0xb8], 0x6); // mov eax, memory space | bus master
    a.emit(&[0x66, 0xef]); // out dx, ax
    a.emit_u32(&[0xba], PCI_CONFIG_ADDRESS); // mov edx, 0xcf8
    a.emit_u32(&[0xb8], slot1(0x10)); // mov eax, slot 1 BAR 0
    a.emit(&[0xef]); // out dx, eax
    a.emit_u32(&[0xba], PCI_CONFIG_DATA); // mov edx, 0xcfc
    a.emit(&[0xed]); // in eax, dx
    a.emit_u32(&[0x25], 0xffff_fff0); // and eax, ~0xf (the address bits)
    a.emit(&[0x89, 0xc3]); // mov ebx, eax

    // The chain: header (device-readable, NEXT), data (WRITE | NEXT), status (WRITE).
    store(&mut a, DESC, HDR);
    store(&mut a, DESC + 8, 16);
    store(&mut a, DESC + 12, 1 | 1 << 16); // flags NEXT, next 1
    store(&mut a, DESC + 16, DATA);
    store(&mut a, DESC + 24, STORM_READ_BYTES);
    store(&mut a, DESC + 28, 3 | 2 << 16); // flags NEXT | WRITE, next 2
    store(&mut a, DESC + 32, STATUS);
    store(&mut a, DESC + 40, 1);
    store(&mut a, DESC + 44, 2); // flags WRITE

    reg8(&mut a, 0x14, 1); // device_status = ACKNOWLEDGE
    reg8(&mut a, 0x14, 1 | 2); // | DRIVER
    reg32(&mut a, 0x08, 1); // driver_feature_select = 1
    reg32(&mut a, 0x0c, 1); // driver_feature = VIRTIO_F_VERSION_1 (bit 32)
    reg8(&mut a, 0x14, 1 | 2 | 8); // | FEATURES_OK
    reg16(&mut a, 0x16, 0); // queue_select = 0
    reg32(&mut a, 0x20, DESC); // queue_desc
    reg32(&mut a, 0x28, AVAIL); // queue_driver
    reg32(&mut a, 0x30, USED); // queue_device
    reg16(&mut a, 0x1c, 1); // queue_enable
    reg8(&mut a, 0x14, 1 | 2 | 4 | 8); // | DRIVER_OK

    a.label("round");
    a.emit_u32(&[0x0f, 0xb7, 0x35], USED + 2); // movzx esi, word [used.idx]
    a.emit_u32(&[0x81, 0xc6], STORM_QUEUED); // add esi, STORM_QUEUED
    a.emit_u32(&[0x66, 0x89, 0x35], AVAIL + 2); // mov [avail.idx], si
    reg32(&mut a, NOTIFY_OFFSET, 0); // notify queue 0
    a.emit_u32(&[0xba], UART_LSR); // mov edx, 0x3fd
    a.emit(&[0xec]); // in al, dx (pacing, as in the counting guest)
    a.rel8(0xeb, "round"); // jmp round

    emit_serial_routines(&mut a);
    build_elf(a.finish(), &[])
}

/// The common start of every guest: interrupts off, the stack set up, the string
/// at `msg` printed.
fn entry(msg: u32) -> Asm {
    let mut a = Asm::new(LOAD_ADDR);
    a.emit(&[0xfa]); // cli
    a.emit_u32(&[0xbc], STACK_TOP); // mov esp, STACK_TOP
    a.emit_u32(&[0xbb], msg); // mov ebx, msg
    a.rel32(&[0xe8], "puts"); // call puts
    a
}

/// Writes a guest image to `dir/name` and returns its path.
pub fn write_guest(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// `puts` (EBX = NUL-terminated string; clobbers EAX, EBX, EDX) and `putc` (AL = byte;
/// clobbers EAX, EDX). `putc` polls the LSR a bounded number of times, as a 16550
/// driver would, so that no byte is lost on a UART that reports a busy transmitter.
fn emit_serial_routines(a: &mut Asm) {
    a.label("puts");
    a.emit(&[0x8a, 0x03]); // mov al, [ebx]
    a.emit(&[0x84, 0xc0]); // test al, al
    a.rel8(0x74, "puts_done"); // jz puts_done
    a.rel32(&[0xe8], "putc"); // call putc
    a.emit(&[0x43]); // inc ebx
    a.rel8(0xeb, "puts"); // jmp puts
    a.label("puts_done");
    a.emit(&[0xc3]); // ret

    a.label("putc");
    a.emit(&[0x51]); // push ecx
    a.emit(&[0x88, 0xc4]); // mov ah, al (keep the byte: `in` overwrites AL)
    a.emit_u32(&[0xba], UART_LSR); // mov edx, 0x3fd
    a.emit_u32(&[0xb9], LSR_POLLS); // mov ecx, LSR_POLLS
    a.label("putc_poll");
    a.emit(&[0xec]); // in al, dx
    a.emit(&[0xa8, 0x20]); // test al, 0x20 (THR empty)
    a.rel8(0x75, "putc_ready"); // jnz putc_ready
    a.emit(&[0x49]); // dec ecx
    a.rel8(0x75, "putc_poll"); // jnz putc_poll
    a.label("putc_ready");
    a.emit(&[0x88, 0xe0]); // mov al, ah
    a.emit_u32(&[0xba], UART_THR); // mov edx, 0x3f8
    a.emit(&[0xee]); // out dx, al
    a.emit(&[0x59]); // pop ecx
    a.emit(&[0xc3]); // ret
}

/// Lays out the loaded segment (code, strings, counter, wake code, note) and
/// wraps it in an ELF64 executable with one PT_LOAD and one PT_NOTE program
/// header.
fn build_elf(code: Vec<u8>, wake_code: &[u8]) -> Vec<u8> {
    assert!(
        code.len() <= CODE_LIMIT as usize,
        "guest code is {} bytes, more than the {CODE_LIMIT} reserved for it",
        code.len()
    );
    assert!(
        WAKE_CODE_ADDR as usize + wake_code.len() <= NOTE_ADDR as usize,
        "wake code of {} bytes overlaps the note",
        wake_code.len()
    );
    let mut segment = vec![0u8; SEGMENT_SIZE as usize];
    let mut put = |addr: u32, bytes: &[u8]| {
        let at = (addr - LOAD_ADDR) as usize;
        segment[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(LOAD_ADDR, &code);
    put(MSG_START_ADDR, format!("{START_LINE}\n\0").as_bytes());
    put(MSG_HELLO_ADDR, format!("{HELLO_LINE}\n\0").as_bytes());
    put(MSG_COUNT_ADDR, b"count=\0");
    put(MSG_SUSPEND_ADDR, format!("{SUSPEND_LINE}\n\0").as_bytes());
    put(MSG_IN_PLACE_ADDR, format!("{IN_PLACE_LINE}\n\0").as_bytes());
    put(COUNTER_ADDR, &0u32.to_le_bytes());
    put(WAKE_CODE_ADDR, wake_code);
    put(NOTE_ADDR, &pvh_note(LOAD_ADDR));

    let mut elf = Vec::with_capacity(SEGMENT_FILE_OFFSET + segment.len());
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_SYSV, padding.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&ET_EXEC.to_le_bytes()); // e_type
    elf.extend_from_slice(&EM_X86_64.to_le_bytes()); // e_machine
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&u64::from(LOAD_ADDR).to_le_bytes()); // e_entry
    elf.extend_from_slice(&(ELF_HEADER_SIZE as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(ELF_HEADER_SIZE as u16).to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(elf.len(), ELF_HEADER_SIZE);

    let segment_len = u64::from(SEGMENT_SIZE);
    push_phdr(
        &mut elf,
        PT_LOAD,
        PF_R | PF_W | PF_X,
        SEGMENT_FILE_OFFSET as u64,
        u64::from(LOAD_ADDR),
        segment_len,
        0x1000,
    );
    // The note lies inside the loaded segment, as `.note.Xen` does in a vmlinux.
    push_phdr(
        &mut elf,
        PT_NOTE,
        PF_R,
        (SEGMENT_FILE_OFFSET as u32 + (NOTE_ADDR - LOAD_ADDR)).into(),
        u64::from(NOTE_ADDR),
        NOTE_SIZE as u64,
        4,
    );
    elf.resize(SEGMENT_FILE_OFFSET, 0);
    elf.extend_from_slice(&segment);
    elf
}

/// One Elf64_Phdr whose file and memory sizes are equal and whose vaddr == paddr.
fn push_phdr(
    elf: &mut Vec<u8>,
    kind: u32,
    flags: u32,
    offset: u64,
    addr: u64,
    size: u64,
    align: u64,
) {
    elf.extend_from_slice(&kind.to_le_bytes()); // p_type
    elf.extend_from_slice(&flags.to_le_bytes()); // p_flags
    elf.extend_from_slice(&offset.to_le_bytes()); // p_offset
    elf.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&size.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&size.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&align.to_le_bytes()); // p_align
}

/// The Xen PVH entry note: namesz 4, descsz 4, type 18, "Xen\0", entry (u32).
fn pvh_note(entry: u32) -> [u8; NOTE_SIZE] {
    let mut note = [0u8; NOTE_SIZE];
    note[0..4].copy_from_slice(&4u32.to_le_bytes());
    note[4..8].copy_from_slice(&4u32.to_le_bytes());
    note[8..12].copy_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note[12..16].copy_from_slice(b"Xen\0");
    note[16..20].copy_from_slice(&entry.to_le_bytes());
    note
}

/// Just enough of an assembler to resolve branch displacements: instructions are
/// emitted as hand-encoded bytes, branches name a label.
struct Asm {
    base: u32,
    code: Vec<u8>,
    labels: Vec<(&'static str, usize)>,
    fixups: Vec<Fixup>,
}

/// A branch displacement to patch: `at` is where it starts, `size` is 1 or 4 bytes;
/// it is relative to the end of the instruction, which is where it ends.
struct Fixup {
    at: usize,
    size: usize,
    label: &'static str,
}

impl Asm {
    fn new(base: u32) -> Self {
        Asm {
            base,
            code: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    /// An opcode followed by a 32-bit immediate, address or displacement.
    fn emit_u32(&mut self, opcode: &[u8], value: u32) {
        self.emit(opcode);
        self.emit(&value.to_le_bytes());
    }

    fn label(&mut self, name: &'static str) {
        assert!(
            self.labels.iter().all(|(n, _)| *n != name),
            "label {name} defined twice"
        );
        self.labels.push((name, self.code.len()));
    }

    /// A short branch: one opcode byte and an 8-bit displacement.
    fn rel8(&mut self, opcode: u8, label: &'static str) {
        self.emit(&[opcode]);
        self.fixup(1, label);
    }

    /// A near call/jump: opcode bytes and a 32-bit displacement.
    fn rel32(&mut self, opcode: &[u8], label: &'static str) {
        self.emit(opcode);
        self.fixup(4, label);
    }

    fn fixup(&mut self, size: usize, label: &'static str) {
        self.fixups.push(Fixup {
            at: self.code.len(),
            size,
            label,
        });
        self.code.resize(self.code.len() + size, 0);
    }

    /// Patches every branch; panics on an unknown label or a short branch out of range.
    fn finish(mut self) -> Vec<u8> {
        for f in &self.fixups {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| *n == f.label)
                .unwrap_or_else(|| panic!("undefined label {}", f.label))
                .1;
            let disp = target as i64 - (f.at + f.size) as i64;
            if f.size == 1 {
                let d = i8::try_from(disp)
                    .unwrap_or_else(|_| panic!("short branch to {} out of range", f.label));
                self.code[f.at] = d as u8;
            } else {
                let d = i32::try_from(disp).expect("near branch in range");
                self.code[f.at..f.at + 4].copy_from_slice(&d.to_le_bytes());
            }
        }
        assert!(
            u64::from(self.base) + self.code.len() as u64 <= u64::from(u32::MAX),
            "code must stay below 4 GiB"
        );
        self.code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// (p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align)
    fn phdr(b: &[u8], index: usize) -> [u64; 8] {
        let at = u64_at(b, 0x20) as usize + index * PHDR_SIZE;
        [
            u32_at(b, at).into(),
            u32_at(b, at + 4).into(),
            u64_at(b, at + 8),
            u64_at(b, at + 16),
            u64_at(b, at + 24),
            u64_at(b, at + 32),
            u64_at(b, at + 40),
            u64_at(b, at + 48),
        ]
    }

    fn all_guests() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("counting", counting_guest()),
            ("power-off", exit_guest(ExitKind::PowerOff)),
            ("reset", exit_guest(ExitKind::Reset)),
            ("storm", storm_guest()),
            ("suspend-real", suspend_guest(Wake::RealMode)),
            ("suspend-32", suspend_guest(Wake::Protected)),
            ("suspend-64", suspend_guest(Wake::Long)),
            ("suspend-none", suspend_guest(Wake::Vector(0))),
        ]
    }

    #[test]
    fn elf_header_fields() {
        for (name, elf) in all_guests() {
            assert_eq!(&elf[0..4], b"\x7fELF", "{name}: magic");
            assert_eq!(elf[4], 2, "{name}: ELFCLASS64");
            assert_eq!(elf[5], 1, "{name}: little-endian");
            assert_eq!(elf[6], 1, "{name}: EV_CURRENT");
            assert_eq!(u16_at(&elf, 0x10), ET_EXEC, "{name}: e_type");
            assert_eq!(u16_at(&elf, 0x12), EM_X86_64, "{name}: e_machine");
            assert_eq!(u32_at(&elf, 0x14), 1, "{name}: e_version");
            assert_eq!(u64_at(&elf, 0x18), 0x10_0000, "{name}: e_entry");
            assert_eq!(u64_at(&elf, 0x20), 64, "{name}: e_phoff");
            assert_eq!(u16_at(&elf, 0x34), 64, "{name}: e_ehsize");
            assert_eq!(u16_at(&elf, 0x36), 56, "{name}: e_phentsize");
            assert_eq!(u16_at(&elf, 0x38), 2, "{name}: e_phnum");
            assert_eq!(u16_at(&elf, 0x3c), 0, "{name}: e_shnum");
        }
    }

    #[test]
    fn load_segment_holds_code_data_and_stack() {
        for (name, elf) in all_guests() {
            let [kind, flags, offset, vaddr, paddr, filesz, memsz, align] = phdr(&elf, 0);
            assert_eq!(kind, u64::from(PT_LOAD), "{name}");
            assert_eq!(flags, u64::from(PF_R | PF_W | PF_X), "{name}");
            assert_eq!((vaddr, paddr), (0x10_0000, 0x10_0000), "{name}");
            assert_eq!((filesz, memsz), (0x1000, 0x1000), "{name}");
            assert_eq!(offset % align, paddr % align, "{name}: congruent offset");
            assert_eq!(
                offset + filesz,
                elf.len() as u64,
                "{name}: segment ends the file"
            );
            let seg = &elf[offset as usize..];
            let at = |addr: u32| (addr - LOAD_ADDR) as usize;
            assert_eq!(
                seg[0], 0xfa,
                "{name}: code starts with cli at the entry point"
            );
            assert_eq!(&seg[at(MSG_START_ADDR)..][..19], b"molt-guest: start\n\0");
            assert_eq!(&seg[at(MSG_HELLO_ADDR)..][..19], b"molt-guest: hello\n\0");
            assert_eq!(&seg[at(MSG_COUNT_ADDR)..][..7], b"count=\0");
            assert_eq!(
                u32_at(seg, at(COUNTER_ADDR)),
                0,
                "{name}: counter starts at 0"
            );
            assert_eq!(COUNTER_ADDR % 4, 0);
            assert_eq!(
                u64::from(STACK_TOP),
                paddr + memsz,
                "{name}: stack at segment top"
            );
        }
    }

    #[test]
    fn pvh_note_names_the_entry_point() {
        for (name, elf) in all_guests() {
            let [kind, _, offset, vaddr, paddr, filesz, _, align] = phdr(&elf, 1);
            assert_eq!(kind, u64::from(PT_NOTE), "{name}");
            assert_eq!((filesz, align), (20, 4), "{name}");
            assert_eq!(vaddr, paddr, "{name}");
            let note = &elf[offset as usize..(offset + filesz) as usize];
            assert_eq!(u32_at(note, 0), 4, "{name}: n_namesz");
            assert_eq!(u32_at(note, 4), 4, "{name}: n_descsz");
            assert_eq!(u32_at(note, 8), 18, "{name}: n_type PHYS32_ENTRY");
            assert_eq!(&note[12..16], b"Xen\0", "{name}: name");
            assert_eq!(u32_at(note, 16), 0x10_0000, "{name}: entry");
            // The note's bytes are where its paddr says, inside the loaded segment.
            let load = phdr(&elf, 0);
            assert_eq!(
                offset - load[2],
                paddr - load[4],
                "{name}: note offset/paddr"
            );
        }
    }

    #[test]
    fn guests_differ_only_where_they_should() {
        let off = exit_guest(ExitKind::PowerOff);
        let reset = exit_guest(ExitKind::Reset);
        let diffs: Vec<usize> = (0..off.len()).filter(|&i| off[i] != reset[i]).collect();
        assert_eq!(
            diffs.len(),
            1,
            "only the value written to port 0x600 differs"
        );
        assert_eq!((off[diffs[0]], reset[diffs[0]]), (0x34, 0x01));
        // `mov al, imm8` right after `mov edx, 0x600`.
        assert_eq!(
            &off[diffs[0] - 6..diffs[0]],
            &[0xba, 0x00, 0x06, 0x00, 0x00, 0xb0]
        );
    }

    #[test]
    fn suspend_guests_carry_their_wake_code_and_messages() {
        for wake in [Wake::RealMode, Wake::Protected, Wake::Long] {
            let elf = suspend_guest(wake);
            let seg = &elf[SEGMENT_FILE_OFFSET..];
            let at = |addr: u32| (addr - LOAD_ADDR) as usize;
            let code = wake_code(wake);
            assert_eq!(
                &seg[at(WAKE_CODE_ADDR)..][..code.len()],
                &code[..],
                "{wake:?}"
            );
            // The line it prints is in it, one `mov al, byte; out dx, al` per byte.
            let printed: Vec<u8> = code
                .windows(3)
                .filter(|w| w[0] == 0xb0 && w[2] == 0xee)
                .map(|w| w[1])
                .collect();
            assert_eq!(printed, format!("{}\n", wake.woken_line()).as_bytes());
            assert_eq!(
                &seg[at(MSG_SUSPEND_ADDR)..][..23],
                b"molt-guest: suspending\n"
            );
        }
        assert!(wake_code(Wake::Vector(0x8000)).is_empty());
    }

    #[test]
    fn branches_resolve() {
        let mut a = Asm::new(LOAD_ADDR);
        a.label("top");
        a.emit(&[0x90]); // nop
        a.rel8(0xeb, "top"); // jmp top
        a.rel32(&[0xe8], "end"); // call end
        a.label("end");
        assert_eq!(a.finish(), vec![0x90, 0xeb, 0xfd, 0xe8, 0, 0, 0, 0]);
    }
}
