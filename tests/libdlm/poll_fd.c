/*
 * A polling libdlm program, as programs on libdlm_lt are written: the
 * default lockspace's descriptor (dlm_get_fd) in poll(), dlm_dispatch to run
 * the callbacks, requests with dlm_lock / dlm_unlock. Built against
 * Debian's libdlm-dev header, linked -ldlm_lt.
 *
 *   poll_fd RESOURCE first    take EX with NOQUEUE, print it, hold it until a
 *                             line comes on stdin, unlock
 *   poll_fd RESOURCE second   try EX with NOQUEUE (refused while the first
 *                             holds it: EAGAIN), then wait for it in the queue
 *
 * One line per callback: "ast <what> status=<sb_status>".
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libdlm.h>

static struct dlm_lksb lksb;
static int completed;

static void ast(void *arg)
{
	printf("ast %s status=%d\n", (const char *)arg, lksb.sb_status);
	completed = 1;
}

/* Polls the descriptor until a callback ran. */
static int wait_ast(int fd)
{
	completed = 0;
	while (!completed) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		if (poll(&p, 1, 20000) != 1) {
			printf("error poll timed out\n");
			return -1;
		}
		if (dlm_dispatch(fd)) {
			printf("error dispatch %d\n", errno);
			return -1;
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	const char *name = argv[1];
	setvbuf(stdout, NULL, _IOLBF, 0);
	int fd = dlm_get_fd();
	if (fd < 0) {
		printf("error get_fd %d\n", errno);
		return 1;
	}
	if (dlm_lock(LKM_EXMODE, &lksb, LKF_NOQUEUE, name, strlen(name), 0, ast, "try", NULL, NULL)) {
		printf("error lock %d\n", errno);
		return 1;
	}
	if (wait_ast(fd))
		return 1;
	if (lksb.sb_status == EAGAIN) {
		if (dlm_lock(LKM_EXMODE, &lksb, 0, name, strlen(name), 0, ast, "queued", NULL, NULL) ||
		    wait_ast(fd))
			return 1;
	}
	if (!strcmp(argv[2], "first")) {
		char line[16];
		printf("holding\n");
		if (!fgets(line, sizeof(line), stdin))
			return 1;
	}
	if (dlm_unlock(lksb.sb_lkid, 0, &lksb, "unlock") || wait_ast(fd))
		return 1;
	printf("done\n");
	return 0;
}
