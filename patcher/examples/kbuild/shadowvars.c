// SPDX-License-Identifier: GPL-2.0
/*
 * The kernel's test-shadow-vars.sh, for lpvmm's shadow-variable runtime: its pre_patch
 * callback makes the calls lib/livepatch/test_klp_shadow_vars.c makes (alloc, get,
 * get_or_alloc, free with a destructor, free_all), plus a refusing constructor and a
 * duplicate alloc, and says in the kernel log what each returned. Objects and data are
 * named PTRn, as the kernel's test does, so that the log reads the same on every run.
 *
 *   lpvmm kp build shadowvars.c -o shadowvars.kp --kernel "$(uname -r of the guest)"
 */
#include <linux/errno.h>
#include <linux/printk.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <lpvmm/patch.h>
#include <lpvmm/shadow.h>

#define NPTRS 20
static const void *lpvmm_sv_ptrs[NPTRS];
static int lpvmm_sv_nptrs;

/* A pointer's stable name: PTR1 for the first one seen, and so on. */
static int ptr_id(const void *p)
{
	int i;

	if (!p)
		return 0;
	for (i = 0; i < lpvmm_sv_nptrs; i++)
		if (lpvmm_sv_ptrs[i] == p)
			return i + 1;
	if (lpvmm_sv_nptrs == NPTRS)
		return -1;
	lpvmm_sv_ptrs[lpvmm_sv_nptrs++] = p;
	return lpvmm_sv_nptrs;
}

#define say(fmt, ...) pr_info("lpvmm-shadow-vars: " fmt "\n", ##__VA_ARGS__)

/* Names for three pointers, given in this order (C leaves the order of arguments open). */
struct names {
	int a, b, c;
};

static struct names ids(const void *a, const void *b, const void *c)
{
	struct names n;

	n.a = ptr_id(a);
	n.b = ptr_id(b);
	n.c = ptr_id(c);
	return n;
}

/* Stores ctor_data (a pointer to a variable of the test) in the new shadow data. */
static int lpvmm_sv_ctor(void *obj, void *shadow_data, void *ctor_data)
{
	struct names n = ids(obj, shadow_data, ctor_data);

	*(void **)shadow_data = ctor_data;
	say("ctor(obj=PTR%d, shadow_data=PTR%d, ctor_data=PTR%d)", n.a, n.b, n.c);
	return 0;
}

static int lpvmm_sv_ctor_fails(void *obj, void *shadow_data, void *ctor_data)
{
	say("ctor(obj=PTR%d) refuses: -12", ptr_id(obj));
	return -ENOMEM;
}

static void lpvmm_sv_dtor(void *obj, void *shadow_data)
{
	struct names n = ids(obj, shadow_data, *(void **)shadow_data);

	say("dtor(obj=PTR%d, shadow_data=PTR%d, holds PTR%d)", n.a, n.b, n.c);
}

static void *get(void *obj, unsigned long id)
{
	void *sv = lpvmm_shadow_get(obj, id);
	struct names n = ids(obj, sv, NULL);

	say("get(obj=PTR%d, id=0x%lx) = PTR%d", n.a, id, n.b);
	return sv;
}

static void *alloc(void *obj, unsigned long id, void *data, lpvmm_shadow_ctor_t ctor)
{
	void *sv = lpvmm_shadow_alloc(obj, id, sizeof(void *), GFP_KERNEL, ctor, data);
	struct names n = ids(obj, data, sv);

	say("alloc(obj=PTR%d, id=0x%lx, ctor_data=PTR%d) = PTR%d", n.a, id, n.b, n.c);
	return sv;
}

static void *get_or_alloc(void *obj, unsigned long id, void *data)
{
	void *sv = lpvmm_shadow_get_or_alloc(obj, id, sizeof(void *), GFP_KERNEL,
					     lpvmm_sv_ctor, data);
	struct names n = ids(obj, data, sv);

	say("get_or_alloc(obj=PTR%d, id=0x%lx, ctor_data=PTR%d) = PTR%d", n.a, id, n.b, n.c);
	return sv;
}

static void check(const char *what, bool ok)
{
	say("%s: %s", what, ok ? "ok" : "FAILED");
}

static int lpvmm_sv_run(struct module *mod)
{
	static int obj, var1, var2, var3, var4;
	unsigned long id = 0x1234, id2 = 0x1235;
	void *sv1, *sv2, *sv3, *sv4;

	ptr_id(NULL);
	check("nothing there at first", !get(&obj, id));
	sv1 = alloc(&obj, id, &var1, lpvmm_sv_ctor);
	sv2 = alloc(&obj + 1, id, &var2, lpvmm_sv_ctor);
	sv3 = alloc(&obj, id2, &var3, lpvmm_sv_ctor);
	check("each is found by <obj, id>",
	      sv1 && sv2 && sv3 && get(&obj, id) == sv1 && get(&obj + 1, id) == sv2 &&
	      get(&obj, id2) == sv3);
	check("each holds its constructor's data", sv1 && *(void **)sv1 == &var1 &&
	      sv2 && *(void **)sv2 == &var2 && sv3 && *(void **)sv3 == &var3);
	sv4 = get_or_alloc(&obj + 2, id, &var4);
	check("get_or_alloc returns the one there", get_or_alloc(&obj + 2, id, &var1) == sv4);
	check("alloc refuses a second <obj, id>", !alloc(&obj, id, &var2, lpvmm_sv_ctor));
	check("a refusing constructor allocates nothing",
	      !alloc(&obj + 3, id, &var1, lpvmm_sv_ctor_fails) && !get(&obj + 3, id));
	lpvmm_shadow_free(&obj, id, lpvmm_sv_dtor);
	check("free: gone", !get(&obj, id));
	lpvmm_shadow_free(&obj + 1, id, lpvmm_sv_dtor);
	lpvmm_shadow_free(&obj + 2, id, lpvmm_sv_dtor);
	check("free: the others gone", !get(&obj + 1, id) && !get(&obj + 2, id));
	check("free leaves other ids", get(&obj, id2) == sv3);
	lpvmm_shadow_free_all(id2, lpvmm_sv_dtor);
	check("free_all: gone", !get(&obj, id2));
	say("done");
	return 0;
}

static int lpvmm_sv_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "lpvmm shadow-vars\n");
	return 0;
}

LPVMM_PATCH("shadowvars");
LPVMM_REPLACE(cmdline_proc_show, lpvmm_sv_cmdline_proc_show);
LPVMM_PRE_PATCH(lpvmm_sv_run);
