// SPDX-License-Identifier: Apache-2.0
/*
 * lpvmm/shadow.h's runtime compiled for the host, with the few kernel calls it makes
 * given by libc (patcher/tests/shadow_runtime.rs builds and runs it): the klp_shadow
 * semantics, then eight threads allocating, finding and freeing at once, after which
 * the table holds exactly what the threads left and its count agrees.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned int gfp_t;
#define GFP_KERNEL 0u
#define ENOMEM 12
struct rcu_head {
	void *next, *func;
};
#define kzalloc(n, gfp) calloc(1, n)
#define kfree free
#define kfree_rcu(p, field) free(p)
#define strscpy(d, s, n) (strncpy(d, s, (n) - 1), (d)[(n) - 1] = 0)
#define pr_warn(...) fprintf(stderr, __VA_ARGS__)
#define cmpxchg(p, o, n) __sync_val_compare_and_swap(p, o, n)
#define cpu_relax() __builtin_ia32_pause()
#define smp_store_release(p, v) __atomic_store_n(p, v, __ATOMIC_RELEASE)
#define X86_EFLAGS_IF 0x200ul
static unsigned long native_save_fl(void) { return X86_EFLAGS_IF; }
static void native_irq_disable(void) {}
static void native_irq_enable(void) {}

#define LPVMM_SHADOW_HOSTED
#include <lpvmm/shadow.h>

struct lpvmm_shadow_table __lpvmm_shadow_table;
LPVMM_PATCH("hosted");

static int failures;
#define CHECK(what, cond)                                                            \
	do {                                                                         \
		if (!(cond)) {                                                       \
			printf("FAILED: %s\n", what);                                \
			failures++;                                                  \
		}                                                                    \
	} while (0)

static int ctor_calls, dtor_calls;
static int ctor(void *obj, void *data, void *arg)
{
	ctor_calls++;
	*(long *)data = (long)arg;
	return 0;
}
static int ctor_refuses(void *obj, void *data, void *arg) { return -ENOMEM; }
static void dtor(void *obj, void *data) { dtor_calls++; }

static const char *container_of_owner(void *data)
{
	return ((struct lpvmm_shadow *)((char *)data - offsetof(struct lpvmm_shadow, data)))->owner;
}

static unsigned long walk_count(void)
{
	unsigned long n = 0;
	for (int b = 0; b < LPVMM_SHADOW_BUCKETS; b++)
		for (struct lpvmm_shadow *s = __lpvmm_shadow_table.buckets[b]; s; s = s->next)
			n++;
	return n;
}

static void semantics(void)
{
	int a, b;
	long *v1, *v2, *v3;

	CHECK("empty", !lpvmm_shadow_get(&a, 1));
	v1 = lpvmm_shadow_alloc(&a, 1, sizeof(long), GFP_KERNEL, ctor, (void *)11);
	v2 = lpvmm_shadow_alloc(&b, 1, sizeof(long), GFP_KERNEL, ctor, (void *)22);
	v3 = lpvmm_shadow_alloc(&a, 2, sizeof(long), GFP_KERNEL, NULL, NULL);
	CHECK("alloc", v1 && v2 && v3 && *v1 == 11 && *v2 == 22 && *v3 == 0);
	CHECK("get", lpvmm_shadow_get(&a, 1) == v1 && lpvmm_shadow_get(&b, 1) == v2 &&
		     lpvmm_shadow_get(&a, 2) == v3);
	CHECK("duplicate alloc", !lpvmm_shadow_alloc(&a, 1, 8, GFP_KERNEL, ctor, NULL));
	CHECK("get_or_alloc finds",
	      lpvmm_shadow_get_or_alloc(&b, 1, 8, GFP_KERNEL, ctor, NULL) == v2);
	CHECK("ctor ran twice", ctor_calls == 2);
	CHECK("refusing ctor", !lpvmm_shadow_alloc(&b, 3, 8, GFP_KERNEL, ctor_refuses, NULL) &&
				       !lpvmm_shadow_get(&b, 3));
	CHECK("owner", !strcmp(container_of_owner(v1), "hosted"));
	lpvmm_shadow_free(&a, 1, dtor);
	CHECK("free", !lpvmm_shadow_get(&a, 1) && lpvmm_shadow_get(&a, 2) == v3 && dtor_calls == 1);
	lpvmm_shadow_free(&a, 1, dtor);
	CHECK("free again is nothing", dtor_calls == 1);
	lpvmm_shadow_free_all(1, dtor);
	CHECK("free_all", !lpvmm_shadow_get(&b, 1) && lpvmm_shadow_get(&a, 2) == v3 &&
				  dtor_calls == 2);
	lpvmm_shadow_free_all(2, NULL);
	CHECK("empty again", __lpvmm_shadow_table.count == 0 && walk_count() == 0);
	CHECK("magic", __lpvmm_shadow_table.magic == LPVMM_SHADOW_MAGIC);
}

#define THREADS 8
#define OBJS 512
#define ROUNDS 200000
static char objs[OBJS];

static void *hammer(void *arg)
{
	unsigned long seed = (unsigned long)arg * 2654435761u + 1;

	for (int i = 0; i < ROUNDS; i++) {
		seed = seed * 6364136223846793005ul + 1442695040888963407ul;
		void *obj = &objs[(seed >> 33) % OBJS];
		unsigned long id = 100 + ((seed >> 20) & 3);
		switch ((seed >> 40) % 3) {
		case 0: {
			long *v = lpvmm_shadow_get_or_alloc(obj, id, sizeof(long), GFP_KERNEL,
							    NULL, NULL);
			if (!v)
				failures++;
			break;
		}
		case 1:
			lpvmm_shadow_get(obj, id);
			break;
		default:
			lpvmm_shadow_free(obj, id, NULL);
		}
	}
	return NULL;
}

static void concurrency(void)
{
	pthread_t t[THREADS];
	unsigned long seen = 0;

	for (long i = 0; i < THREADS; i++)
		pthread_create(&t[i], NULL, hammer, (void *)(i + 1));
	for (int i = 0; i < THREADS; i++)
		pthread_join(t[i], NULL);
	CHECK("count agrees with the table", walk_count() == __lpvmm_shadow_table.count);
	for (int o = 0; o < OBJS; o++)
		for (unsigned long id = 100; id < 104; id++)
			seen += lpvmm_shadow_get(&objs[o], id) != NULL;
	CHECK("every variable found by its key", seen == __lpvmm_shadow_table.count);
	for (unsigned long id = 100; id < 104; id++)
		lpvmm_shadow_free_all(id, NULL);
	CHECK("free_all empties it", __lpvmm_shadow_table.count == 0 && walk_count() == 0);
	printf("concurrency: %lu variables were left by %d threads\n", seen, THREADS);
}

int main(void)
{
	semantics();
	concurrency();
	printf(failures ? "%d FAILED\n" : "all ok\n", failures);
	return failures != 0;
}
