/*
 * lpvmm/shadow.h: shadow variables for lpvmm patches (the kernel livepatch's klp_shadow
 * API), on any guest kernel, CONFIG_LIVEPATCH or not.
 *
 * A shadow variable is data a patch attaches to a live kernel object it cannot grow: a
 * new field of a structure, keyed by the object's address and a number the patch
 * authors choose (`id`). The calls are the kernel's, spelled lpvmm_shadow_* (the klp_
 * names work too, as long as the patch does not include <linux/livepatch.h>):
 *
 *   void *lpvmm_shadow_get(void *obj, unsigned long id);
 *   void *lpvmm_shadow_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp,
 *                            lpvmm_shadow_ctor_t ctor, void *ctor_data);
 *   void *lpvmm_shadow_get_or_alloc(... the same ...);
 *   void lpvmm_shadow_free(void *obj, unsigned long id, lpvmm_shadow_dtor_t dtor);
 *   void lpvmm_shadow_free_all(unsigned long id, lpvmm_shadow_dtor_t dtor);
 *
 * with the kernel's rules: alloc returns NULL (and says so in the log) if <obj, id> exists already;
 * get_or_alloc returns the one there; a constructor runs under the table's spinlock,
 * interrupts off (it must not sleep), and a non-zero return frees the new variable;
 * a destructor runs the same way just before the variable is freed.
 *
 * The code is in this header and so in each patch. The variables are in one table per
 * guest, which lpvmm keeps in its patch area (`__lpvmm_shadow_table`, a symbol lpvmm's
 * loader resolves), so a cumulative patch finds what the patch it replaces allocated,
 * and `lpvmm shadow VM` lists them from outside. Each variable is memory of the guest's
 * own allocator (kmalloc), freed with kfree_rcu. The layout of the table and of a
 * variable is fixed (lpvmm reads it; version LPVMM_SHADOW_VERSION).
 *
 * LPVMM_SHADOW(id, state) ties variable `id` to state `state` (LPVMM_STATE): lpvmm frees
 * every variable `id` once the state ends (after its release callback: the last patch
 * holding it disabled), so they live exactly as long as the state.
 * LPVMM_SHADOW_DTOR(id, state, dtor) does the same with a destructor.
 *
 * Needs `lpvmm kp build --kernel RELEASE` (the guest's kbuild): it uses its headers.
 */
#ifndef LPVMM_SHADOW_H
#define LPVMM_SHADOW_H

#ifndef LPVMM_SHADOW_HOSTED
#include <linux/atomic.h>
#include <linux/printk.h>
#include <linux/rcupdate.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <asm/irqflags.h>
#include <asm/processor.h>
#endif
#include <lpvmm/patch.h>

#define LPVMM_SHADOW_MAGIC 0x3148534d4d56504cUL /* "LPVMMSH1" */
#define LPVMM_SHADOW_VERSION 1
#define LPVMM_SHADOW_BUCKETS 64
#define LPVMM_SHADOW_OWNER 32

typedef int (*lpvmm_shadow_ctor_t)(void *obj, void *shadow_data, void *ctor_data);
typedef void (*lpvmm_shadow_dtor_t)(void *obj, void *shadow_data);

/* One variable; lpvmm reads these fields at these offsets. */
struct lpvmm_shadow {
	struct lpvmm_shadow *next;	/* 0: the bucket's next */
	void *obj;			/* 8 */
	unsigned long id;		/* 16 */
	unsigned long size;		/* 24: of data */
	char owner[LPVMM_SHADOW_OWNER];	/* 32: the patch that allocated it */
	struct rcu_head rcu;		/* 64 */
	char data[] __attribute__((aligned(8)));
};

/* The guest's one table (zeroed memory is an empty one). */
struct lpvmm_shadow_table {
	unsigned long magic;		/* 0: LPVMM_SHADOW_MAGIC once used */
	unsigned long count;		/* 8: variables in the table */
	struct lpvmm_shadow *buckets[LPVMM_SHADOW_BUCKETS];	/* 16 */
	unsigned int lock;		/* 16 + 8 * BUCKETS: 0 unlocked, 1 held */
};

/* The offsets lpvmm reads (patcher/src/shadow.rs). */
_Static_assert(__builtin_offsetof(struct lpvmm_shadow, owner) == 32, "lpvmm_shadow layout");
_Static_assert(__builtin_offsetof(struct lpvmm_shadow, rcu) == 64, "lpvmm_shadow layout");
_Static_assert(__builtin_offsetof(struct lpvmm_shadow_table, buckets) == 16, "table layout");
_Static_assert(sizeof(struct lpvmm_shadow_table) <= 4096, "the table fits its page");

extern struct lpvmm_shadow_table __lpvmm_shadow_table;

/* The patch's name, for `owner` (defined by LPVMM_PATCH). */
static const char *__lpvmm_patch_name(void);

/*
 * The table's lock: a plain test-and-set spinlock, interrupts off while it is held.
 * Not the kernel's spinlock_t: its size and its code (paravirt call sites, which lpvmm's
 * loader refuses) differ with the kernel's configuration, and zeroed memory must be an
 * unlocked lock without anyone initialising it. Held for a walk of one bucket
 * (of all of them in free_all).
 */
static inline unsigned long __lpvmm_shadow_lock(void)
{
	unsigned long flags = native_save_fl();

	native_irq_disable();
	while (cmpxchg(&__lpvmm_shadow_table.lock, 0, 1) != 0)
		cpu_relax();
	return flags;
}

static inline void __lpvmm_shadow_unlock(unsigned long flags)
{
	smp_store_release(&__lpvmm_shadow_table.lock, 0);
	if (flags & X86_EFLAGS_IF)
		native_irq_enable();
}

static inline struct lpvmm_shadow **__lpvmm_shadow_bucket(void *obj)
{
	unsigned long h = (unsigned long)obj;

	h ^= h >> 17;
	h *= 0x9e3779b97f4a7c15UL;
	return &__lpvmm_shadow_table.buckets[h >> (64 - 6)];
}

/* The link that points at <obj, id>'s variable, or at the bucket's end. Locked. */
static inline struct lpvmm_shadow **__lpvmm_shadow_find(void *obj, unsigned long id)
{
	struct lpvmm_shadow **at = __lpvmm_shadow_bucket(obj);

	while (*at && ((*at)->obj != obj || (*at)->id != id))
		at = &(*at)->next;
	return at;
}

static inline void *lpvmm_shadow_get(void *obj, unsigned long id)
{
	unsigned long flags = __lpvmm_shadow_lock();
	struct lpvmm_shadow *s = *__lpvmm_shadow_find(obj, id);

	__lpvmm_shadow_unlock(flags);
	return s ? s->data : NULL;
}

static inline void *__lpvmm_shadow_get_or_alloc(void *obj, unsigned long id, size_t size,
						gfp_t gfp, lpvmm_shadow_ctor_t ctor,
						void *ctor_data, bool warn_on_exist)
{
	struct lpvmm_shadow *fresh, **at;
	unsigned long flags;
	void *data = lpvmm_shadow_get(obj, id);

	if (data)
		goto exists;
	/* Allocated outside the lock (gfp may sleep), then checked again under it. */
	fresh = kzalloc(sizeof(*fresh) + size, gfp);
	if (!fresh)
		return NULL;
	fresh->obj = obj;
	fresh->id = id;
	fresh->size = size;
	strscpy(fresh->owner, __lpvmm_patch_name(), LPVMM_SHADOW_OWNER);
	flags = __lpvmm_shadow_lock();
	at = __lpvmm_shadow_find(obj, id);
	if (*at) {
		data = (*at)->data;
		__lpvmm_shadow_unlock(flags);
		kfree(fresh);
		goto exists;
	}
	if (ctor && ctor(obj, fresh->data, ctor_data)) {
		__lpvmm_shadow_unlock(flags);
		kfree(fresh);
		return NULL;
	}
	*at = fresh;
	__lpvmm_shadow_table.magic = LPVMM_SHADOW_MAGIC;
	__lpvmm_shadow_table.count++;
	__lpvmm_shadow_unlock(flags);
	return fresh->data;
exists:
	if (warn_on_exist) {
		pr_warn("lpvmm shadow: duplicate shadow variable <%px, %lx>\n", obj, id);
		return NULL;
	}
	return data;
}

static inline void *lpvmm_shadow_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp,
				       lpvmm_shadow_ctor_t ctor, void *ctor_data)
{
	return __lpvmm_shadow_get_or_alloc(obj, id, size, gfp, ctor, ctor_data, true);
}

static inline void *lpvmm_shadow_get_or_alloc(void *obj, unsigned long id, size_t size,
					      gfp_t gfp, lpvmm_shadow_ctor_t ctor,
					      void *ctor_data)
{
	return __lpvmm_shadow_get_or_alloc(obj, id, size, gfp, ctor, ctor_data, false);
}

/* Unlink *at's variable, run dtor on it and free it. Locked. */
static inline void __lpvmm_shadow_drop(struct lpvmm_shadow **at, lpvmm_shadow_dtor_t dtor)
{
	struct lpvmm_shadow *s = *at;

	*at = s->next;
	__lpvmm_shadow_table.count--;
	if (dtor)
		dtor(s->obj, s->data);
	kfree_rcu(s, rcu);
}

static inline void lpvmm_shadow_free(void *obj, unsigned long id, lpvmm_shadow_dtor_t dtor)
{
	unsigned long flags = __lpvmm_shadow_lock();
	struct lpvmm_shadow **at = __lpvmm_shadow_find(obj, id);

	if (*at)
		__lpvmm_shadow_drop(at, dtor);
	__lpvmm_shadow_unlock(flags);
}

static inline void lpvmm_shadow_free_all(unsigned long id, lpvmm_shadow_dtor_t dtor)
{
	unsigned long flags = __lpvmm_shadow_lock();
	int b;

	for (b = 0; b < LPVMM_SHADOW_BUCKETS; b++) {
		struct lpvmm_shadow **at = &__lpvmm_shadow_table.buckets[b];

		while (*at) {
			if ((*at)->id == id)
				__lpvmm_shadow_drop(at, dtor);
			else
				at = &(*at)->next;
		}
	}
	__lpvmm_shadow_unlock(flags);
}

#define klp_shadow_ctor_t lpvmm_shadow_ctor_t
#define klp_shadow_dtor_t lpvmm_shadow_dtor_t
#define klp_shadow_get lpvmm_shadow_get
#define klp_shadow_alloc lpvmm_shadow_alloc
#define klp_shadow_get_or_alloc lpvmm_shadow_get_or_alloc
#define klp_shadow_free lpvmm_shadow_free
#define klp_shadow_free_all lpvmm_shadow_free_all

/*
 * Tie variable `id` to state `state`: lpvmm calls the function this defines, which
 * frees every variable `id` (with `dtor`, or none), once the state ends.
 */
#define LPVMM_SHADOW_DTOR(id, state, dtor)                                           \
	static int __LPVMM_CAT(__lpvmm_shadow_free_, id)(unsigned long st)           \
	{                                                                            \
		lpvmm_shadow_free_all(id, dtor);                                     \
		return 0;                                                            \
	}                                                                            \
	static void *__LPVMM_CAT(__lpvmm_keep_shadow_, id)                           \
		__attribute__((section(".lpvmm.keep"), used)) =                      \
			(void *)__LPVMM_CAT(__lpvmm_shadow_free_, id);               \
	__LPVMM_ENTRY("shadow=" __LPVMM_STR(id) ":" __LPVMM_STR(state) ":"           \
		      __LPVMM_STR(__LPVMM_CAT(__lpvmm_shadow_free_, id)))
#define LPVMM_SHADOW(id, state) LPVMM_SHADOW_DTOR(id, state, NULL)

#endif /* LPVMM_SHADOW_H */
