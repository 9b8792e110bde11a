// SPDX-License-Identifier: GPL-2.0
/*
 * labedu: a minimal driver for QEMU's edu test device (1234:11e8) in the
 * lab's L3 guest, which molt gets by VFIO passthrough. The checks themselves
 * run in userspace (rootfs/tools/labedu.c); this module does only what needs
 * the kernel: it binds the device, enables bus mastering, sets edu's 28-bit
 * DMA mask, takes one MSI vector and handles it, and offers /dev/labedu:
 *
 *   mmap at offset 0      BAR 0 (edu's registers, 1 MiB), uncached
 *   mmap at offset 1 MiB  a 4 KiB coherent DMA buffer (below 256 MiB)
 *   read                  struct { u64 irqs; u64 dma_addr; }: MSIs handled
 *                         so far and the buffer's bus address
 *   poll                  readable once irqs differs from what this open
 *                         file last read
 *
 * Suspend to RAM (ACPI S3): the PCI core saves the config space at suspend
 * and writes it back at resume (BAR, command, MSI address and data). Across
 * a reboot-mode update molt re-opens edu on the host, whose VFIO disables
 * bus mastering and MSI when the old molt lets go, so resume also sets bus
 * mastering again, acknowledges whatever edu raised meanwhile and checks the
 * ID register answers; it logs "labedu: resumed" for the lab to see.
 *
 * Why a module: the guest kernel (Debian cloud) has no VFIO no-IOMMU mode and
 * uio_pci_generic only does INTx, while the point is edu's MSI.
 */
#include <linux/atomic.h>
#include <linux/dma-mapping.h>
#include <linux/fs.h>
#include <linux/interrupt.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/poll.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#define EDU_BAR_SIZE	(1UL << 20)
#define EDU_ID		0x00
#define EDU_ID_VALUE	0x010000ed
#define EDU_IRQ_STATUS	0x24
#define EDU_IRQ_ACK	0x64
#define BUF_SIZE	4096

struct labedu {
	struct pci_dev *pdev;
	void __iomem *bar;
	void *buf;
	dma_addr_t buf_dma;
	atomic64_t irqs;
	wait_queue_head_t wait;
	struct miscdevice misc;
};

/* One edu per guest is all the lab has. */
static struct labedu *edu;

static irqreturn_t labedu_irq(int irq, void *data)
{
	struct labedu *e = data;
	u32 status = ioread32(e->bar + EDU_IRQ_STATUS);

	iowrite32(status, e->bar + EDU_IRQ_ACK);
	atomic64_inc(&e->irqs);
	wake_up_interruptible(&e->wait);
	return IRQ_HANDLED;
}

static int labedu_open(struct inode *inode, struct file *f)
{
	u64 *seen = kzalloc(sizeof(*seen), GFP_KERNEL);

	if (!seen)
		return -ENOMEM;
	*seen = atomic64_read(&edu->irqs);
	f->private_data = seen;
	return 0;
}

static int labedu_release(struct inode *inode, struct file *f)
{
	kfree(f->private_data);
	return 0;
}

static ssize_t labedu_read(struct file *f, char __user *ubuf, size_t n,
			   loff_t *off)
{
	u64 *seen = f->private_data;
	u64 info[2];

	if (n < sizeof(info))
		return -EINVAL;
	info[0] = atomic64_read(&edu->irqs);
	info[1] = edu->buf_dma;
	*seen = info[0];
	if (copy_to_user(ubuf, info, sizeof(info)))
		return -EFAULT;
	return sizeof(info);
}

static __poll_t labedu_poll(struct file *f, poll_table *wait)
{
	u64 *seen = f->private_data;

	poll_wait(f, &edu->wait, wait);
	return atomic64_read(&edu->irqs) != *seen ? EPOLLIN | EPOLLRDNORM : 0;
}

static int labedu_mmap(struct file *f, struct vm_area_struct *vma)
{
	unsigned long len = vma->vm_end - vma->vm_start;

	if (vma->vm_pgoff == 0) {
		vma->vm_page_prot = pgprot_noncached(vma->vm_page_prot);
		return vm_iomap_memory(vma, pci_resource_start(edu->pdev, 0),
				       min(pci_resource_len(edu->pdev, 0),
					   (resource_size_t)EDU_BAR_SIZE));
	}
	if (vma->vm_pgoff == EDU_BAR_SIZE >> PAGE_SHIFT && len <= BUF_SIZE) {
		vma->vm_pgoff = 0;
		return dma_mmap_coherent(&edu->pdev->dev, vma, edu->buf,
					 edu->buf_dma, len);
	}
	return -EINVAL;
}

static const struct file_operations labedu_fops = {
	.owner = THIS_MODULE,
	.open = labedu_open,
	.release = labedu_release,
	.read = labedu_read,
	.poll = labedu_poll,
	.mmap = labedu_mmap,
	.llseek = noop_llseek,
};

static int labedu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct labedu *e;
	int err, irq;

	if (edu)
		return -EBUSY;
	e = devm_kzalloc(&pdev->dev, sizeof(*e), GFP_KERNEL);
	if (!e)
		return -ENOMEM;
	e->pdev = pdev;
	err = pcim_enable_device(pdev);
	if (err)
		return err;
	pci_set_master(pdev);
	err = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(28));
	if (err)
		return err;
	e->bar = pcim_iomap(pdev, 0, 0);
	if (!e->bar)
		return -ENOMEM;
	/* MSI only: falling back to INTx would hide what is tested. */
	err = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSI);
	if (err < 0) {
		dev_err(&pdev->dev, "labedu: no MSI (%d)\n", err);
		return err;
	}
	irq = pci_irq_vector(pdev, 0);
	init_waitqueue_head(&e->wait);
	atomic64_set(&e->irqs, 0);
	err = devm_request_irq(&pdev->dev, irq, labedu_irq, 0, "labedu", e);
	if (err)
		return err;
	e->buf = dmam_alloc_coherent(&pdev->dev, BUF_SIZE, &e->buf_dma,
				     GFP_KERNEL);
	if (!e->buf)
		return -ENOMEM;
	e->misc.minor = MISC_DYNAMIC_MINOR;
	e->misc.name = "labedu";
	e->misc.fops = &labedu_fops;
	edu = e;
	err = misc_register(&e->misc);
	if (err) {
		edu = NULL;
		return err;
	}
	pci_set_drvdata(pdev, e);
	dev_info(&pdev->dev, "labedu: MSI on irq %d, DMA buffer at %pad\n",
		 irq, &e->buf_dma);
	return 0;
}

static void labedu_remove(struct pci_dev *pdev)
{
	struct labedu *e = pci_get_drvdata(pdev);

	misc_deregister(&e->misc);
	edu = NULL;
}

static int labedu_suspend(struct device *dev)
{
	struct labedu *e = dev_get_drvdata(dev);

	dev_info(dev, "labedu: suspending after %llu MSIs\n",
		 (unsigned long long)atomic64_read(&e->irqs));
	return 0;
}

static int labedu_resume(struct device *dev)
{
	struct labedu *e = dev_get_drvdata(dev);
	struct pci_dev *pdev = to_pci_dev(dev);
	u32 id, status;
	u16 cmd;

	pci_set_master(pdev);
	status = ioread32(e->bar + EDU_IRQ_STATUS);
	if (status)
		iowrite32(status, e->bar + EDU_IRQ_ACK);
	id = ioread32(e->bar + EDU_ID);
	pci_read_config_word(pdev, PCI_COMMAND, &cmd);
	if (id != EDU_ID_VALUE) {
		dev_err(dev, "labedu: resume: ID register reads %#x, not %#x\n",
			id, EDU_ID_VALUE);
		return -EIO;
	}
	dev_info(dev, "labedu: resumed: id %#x, command %#06x, interrupt status was %#x\n",
		 id, cmd, status);
	return 0;
}

static DEFINE_SIMPLE_DEV_PM_OPS(labedu_pm, labedu_suspend, labedu_resume);

static const struct pci_device_id labedu_ids[] = {
	{ PCI_DEVICE(0x1234, 0x11e8) },
	{ }
};
MODULE_DEVICE_TABLE(pci, labedu_ids);

static struct pci_driver labedu_driver = {
	.name = "labedu",
	.id_table = labedu_ids,
	.probe = labedu_probe,
	.remove = labedu_remove,
	.driver.pm = pm_sleep_ptr(&labedu_pm),
};
module_pci_driver(labedu_driver);

MODULE_DESCRIPTION("edu test device driver for molt's VFIO lab tests");
MODULE_LICENSE("GPL");
