/* Can this kernel hand a VFIO container's DMA mappings to a new process, and
 * to the same process after execve? molt's exec and transfer updates with a
 * VFIO device need both (issue 11). Drives QEMU's edu device through vfio-pci
 * in the lab host (L2), the way molt will: a memfd buffer is DMA-mapped, the
 * old process invalidates its vaddr (VFIO_DMA_UNMAP_FLAG_VADDR), a new process
 * re-maps it (VFIO_DMA_MAP_FLAG_VADDR); then that process does the same across
 * its own execve. The device is never closed or reset in between.
 *
 *   labvfio /dev/vfio/GROUP BDF      (BDF bound to vfio-pci)
 *
 * Prints `name=value` lines, for the scenario to judge:
 *   update_vaddr_unset  VFIO_CHECK_EXTENSION(VFIO_UPDATE_VADDR) before
 *                       VFIO_SET_IOMMU (0 since Linux 6.3 / 6.1.16: the answer
 *                       depends on the container's groups)
 *   update_vaddr        the same once the type1 IOMMU is set
 *   lck_map_kb          VmLck growth of the first process from MAP_DMA
 *   dma_old             edu DMA round trip (RAM -> edu -> RAM) in it
 *   lck_new_kb          VmLck of the new process after it re-mapped
 *   lck_old_kb          VmLck growth of the old process after that (0: the
 *                       pinned pages' account moved with the mappings)
 *   dma_new             edu round trip in the new process, the old one gone
 *   lck_exec_kb         VmLck after the new process's execve and re-map
 *   dma_exec            edu round trip after that execve
 *   lck_unmap_kb        VmLck after the final, real unmap (0)
 * A kernel without vfio_change_dma_owner (before 6.3 / 6.1.16) leaves the
 * account with the first mm: lck_new_kb, lck_exec_kb 0 and lck_old_kb 2048. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define IOVA 0x100000ull   /* below edu's 28-bit DMA mask */
#define SIZE 0x200000ull
#define EDU_BUF 0x40000ull /* edu's 4 KiB buffer in its own address space */
/* QEMU 7.2's edu takes a transfer that reaches the buffer's last byte as out
 * of bounds, and that is a hw_error: QEMU (the whole L2) aborts. */
#define DMA_LEN 2048

static void die(const char *what) {
    printf("error=%s: %m\n", what);
    exit(1);
}

static long vmlck_kb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmLck: %ld kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

static uint8_t *map_buffer(int memfd) {
    void *p = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (p == MAP_FAILED) die("mmap memfd");
    return p;
}

static void dma_vaddr(int container, int map, uint8_t *buf) {
    if (map) {
        struct vfio_iommu_type1_dma_map m = { .argsz = sizeof m, .flags = VFIO_DMA_MAP_FLAG_VADDR,
                                              .vaddr = (uintptr_t)buf, .iova = IOVA, .size = SIZE };
        if (ioctl(container, VFIO_IOMMU_MAP_DMA, &m)) die("MAP_DMA vaddr");
    } else {
        struct vfio_iommu_type1_dma_unmap u = { .argsz = sizeof u, .flags = VFIO_DMA_UNMAP_FLAG_VADDR,
                                                .iova = IOVA, .size = SIZE };
        if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u)) die("UNMAP_DMA vaddr");
    }
}

/* One edu DMA of DMA_LEN bytes; done when edu clears the run bit (after its 100 ms timer). */
static int edu_dma(volatile uint64_t *bar, uint64_t src, uint64_t dst, uint64_t cmd) {
    bar[0x80 / 8] = src;
    bar[0x88 / 8] = dst;
    bar[0x90 / 8] = DMA_LEN;
    bar[0x98 / 8] = cmd | 1;
    for (int i = 0; i < 2000; i++) {
        if (!(bar[0x98 / 8] & 1)) return 0;
        nanosleep(&(struct timespec){ 0, 10000000 }, NULL);
    }
    return -1;
}

/* A pattern from guest-RAM-like memory into edu and back to the next page. */
static const char *dma_round_trip(int device, uint8_t *buf, unsigned seed) {
    struct vfio_region_info r = { .argsz = sizeof r, .index = VFIO_PCI_BAR0_REGION_INDEX };
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &r)) die("BAR0 info");
    volatile uint64_t *bar = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, device, r.offset);
    if (bar == MAP_FAILED) die("mmap BAR0");
    const char *res;
    for (int i = 0; i < DMA_LEN; i++) buf[i] = (uint8_t)(i * 7 + seed);
    memset(buf + 4096, 0, DMA_LEN);
    /* edu answers only 4-byte reads below 0x80. */
    if (*(volatile uint32_t *)bar != 0x010000ed) res = "bad_id";
    else if (edu_dma(bar, IOVA, EDU_BUF, 0) || edu_dma(bar, EDU_BUF, IOVA + 4096, 2)) res = "timeout";
    else res = memcmp(buf, buf + 4096, DMA_LEN) ? "mismatch" : "ok";
    munmap((void *)bar, 4096);
    return res;
}

/* argv of the next stage: STAGE CONTAINER DEVICE MEMFD [UP DOWN]. */
static void exec_stage(const char *stage, int container, int device, int memfd, int up, int down) {
    char a[5][16];
    snprintf(a[0], 16, "%d", container), snprintf(a[1], 16, "%d", device);
    snprintf(a[2], 16, "%d", memfd), snprintf(a[3], 16, "%d", up), snprintf(a[4], 16, "%d", down);
    /* VFIO_GROUP_GET_DEVICE_FD's descriptor is close-on-exec. */
    int fds[] = { container, device, memfd, up, down };
    for (int i = 0; i < 5; i++)
        if (fds[i] >= 0 && fcntl(fds[i], F_SETFD, 0)) die("clear FD_CLOEXEC");
    fflush(stdout);
    execl("/proc/self/exe", "labvfio", stage, a[0], a[1], a[2], a[3], a[4], (char *)NULL);
    die("execl");
}

/* The first process: opens everything, maps, hands over to a fork+exec'd one. */
static int first(const char *group_path, const char *bdf) {
    int container = open("/dev/vfio/vfio", O_RDWR), group = open(group_path, O_RDWR);
    if (container < 0 || group < 0) die("open container or group");
    struct vfio_group_status gs = { .argsz = sizeof gs };
    if (ioctl(group, VFIO_GROUP_GET_STATUS, &gs) || !(gs.flags & VFIO_GROUP_FLAGS_VIABLE)) die("group viable");
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container)) die("SET_CONTAINER");
    printf("update_vaddr_unset=%d\n", ioctl(container, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR));
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) die("SET_IOMMU");
    printf("update_vaddr=%d\n", ioctl(container, VFIO_CHECK_EXTENSION, VFIO_UPDATE_VADDR));
    int device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (device < 0) die("GET_DEVICE_FD");
    /* Memory space and bus master on, through the config region. */
    struct vfio_region_info cfg = { .argsz = sizeof cfg, .index = VFIO_PCI_CONFIG_REGION_INDEX };
    uint16_t cmd;
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &cfg) || pread(device, &cmd, 2, cfg.offset + 4) != 2)
        die("read PCI command");
    cmd |= 0x6;
    if (pwrite(device, &cmd, 2, cfg.offset + 4) != 2) die("write PCI command");

    int memfd = memfd_create("labvfio", 0);
    if (memfd < 0 || ftruncate(memfd, SIZE)) die("memfd");
    uint8_t *buf = map_buffer(memfd);
    memset(buf, 0, SIZE);
    long lck0 = vmlck_kb();
    struct vfio_iommu_type1_dma_map m = { .argsz = sizeof m,
                                          .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                          .vaddr = (uintptr_t)buf, .iova = IOVA, .size = SIZE };
    if (ioctl(container, VFIO_IOMMU_MAP_DMA, &m)) die("MAP_DMA");
    printf("lck_map_kb=%ld\n", vmlck_kb() - lck0);
    printf("dma_old=%s\n", dma_round_trip(device, buf, 1));
    dma_vaddr(container, 0, buf);

    /* up: the new process says it has the mappings; down: its EOF says the
     * old process is gone. */
    int up[2], down[2];
    if (pipe(up) || pipe(down)) die("pipe");
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        close(up[0]), close(down[1]);
        exec_stage("new", container, device, memfd, up[1], down[0]);
    }
    close(up[1]), close(down[0]);
    char c;
    if (read(up[0], &c, 1) != 1) die("new process did not take over");
    printf("lck_old_kb=%ld\n", vmlck_kb() - lck0);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3) {
        /* Reap the new process too once the first is gone, so the caller
         * sees the whole run end. */
        if (prctl(PR_SET_CHILD_SUBREAPER, 1)) die("subreaper");
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) return first(argv[1], argv[2]);
        int st, ok = 1;
        while (wait(&st) > 0) ok &= WIFEXITED(st) && WEXITSTATUS(st) == 0;
        return ok ? 0 : 1;
    }
    if (argc != 7) {
        fprintf(stderr, "usage: labvfio /dev/vfio/GROUP BDF\n");
        return 2;
    }
    int container = atoi(argv[2]), device = atoi(argv[3]), memfd = atoi(argv[4]);
    uint8_t *buf = map_buffer(memfd);
    dma_vaddr(container, 1, buf);
    if (!strcmp(argv[1], "new")) {
        int up = atoi(argv[5]), down = atoi(argv[6]);
        printf("lck_new_kb=%ld\n", vmlck_kb());
        char c = 1;
        if (write(up, &c, 1) != 1) die("write up");
        close(up);
        while (read(down, &c, 1) > 0) {}
        close(down);
        printf("dma_new=%s\n", dma_round_trip(device, buf, 2));
        dma_vaddr(container, 0, buf);
        exec_stage("exec", container, device, memfd, -1, -1);
    }
    printf("lck_exec_kb=%ld\n", vmlck_kb());
    printf("dma_exec=%s\n", dma_round_trip(device, buf, 3));
    struct vfio_iommu_type1_dma_unmap u = { .argsz = sizeof u, .iova = IOVA, .size = SIZE };
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &u)) die("UNMAP_DMA");
    printf("lck_unmap_kb=%ld\n", vmlck_kb());
    return 0;
}
