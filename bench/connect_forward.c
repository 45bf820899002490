/* A CONNECT forwarder for the interception benchmark (bench/intercept_load.py).

   wrk cannot send CONNECT. This listens on 127.0.0.1:<listen>; for each accepted connection it
   connects to the proxy at 127.0.0.1:<proxy>, sends `CONNECT <authority> HTTP/1.1`, waits for
   the 200, then relays bytes both ways. So `wrk https://localhost:<listen>/100b` is an app
   calling https://<authority>/100b through HTTPS_PROXY, keep-alive, one tunnel per wrk
   connection. Written in C so the relay costs the load CPU as little as possible (two reads and
   two writes per request); one thread, epoll, blocking set-up (connections are few and long).

   cc -O2 -o connect_forward bench/connect_forward.c
   connect_forward <listen-port> <proxy-port> <authority>
*/
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FDS 65536
static int peer[MAX_FDS];

static int connect_proxy(int port, const char *authority) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { close(fd); return -1; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char request[512];
    int n = snprintf(request, sizeof request, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", authority, authority);
    if (write(fd, request, n) != n) { close(fd); return -1; }
    char head[4096];
    int got = 0;
    while (got < (int)sizeof head - 1) {  /* the proxy sends nothing after its head until we do */
        int r = read(fd, head + got, 1);
        if (r <= 0) { close(fd); return -1; }
        got += r;
        head[got] = 0;
        if (got >= 4 && strcmp(head + got - 4, "\r\n\r\n") == 0) break;
    }
    if (strncmp(head, "HTTP/1.1 200", 12) != 0 && strncmp(head, "HTTP/1.0 200", 12) != 0) {
        fprintf(stderr, "CONNECT refused: %.80s\n", head);
        close(fd);
        return -1;
    }
    return fd;
}

static void drop(int ep, int fd) {
    int other = peer[fd];
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    epoll_ctl(ep, EPOLL_CTL_DEL, other, NULL);
    close(fd);
    close(other);
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s listen-port proxy-port authority\n", argv[0]); return 2; }
    int listen_port = atoi(argv[1]), proxy_port = atoi(argv[2]);
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(listen_port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) { perror("listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("listening %d\n", listen_port);
    fflush(stdout);
    static char buffer[1 << 16];
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0 && errno == EINTR) continue;
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                int client = accept(lfd, NULL, NULL);
                if (client < 0) continue;
                setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                int upstream = connect_proxy(proxy_port, argv[3]);
                if (upstream < 0 || client >= MAX_FDS || upstream >= MAX_FDS) { close(client); continue; }
                peer[client] = upstream;
                peer[upstream] = client;
                struct epoll_event a = {.events = EPOLLIN, .data.fd = client};
                struct epoll_event b = {.events = EPOLLIN, .data.fd = upstream};
                epoll_ctl(ep, EPOLL_CTL_ADD, client, &a);
                epoll_ctl(ep, EPOLL_CTL_ADD, upstream, &b);
                continue;
            }
            ssize_t r = read(fd, buffer, sizeof buffer);
            if (r <= 0) { drop(ep, fd); continue; }
            ssize_t off = 0;
            while (off < r) {  /* blocking-enough for a benchmark: the other side drains quickly */
                ssize_t w = write(peer[fd], buffer + off, r - off);
                if (w < 0) { if (errno == EAGAIN || errno == EINTR) continue; break; }
                off += w;
            }
            if (off < r) drop(ep, fd);
        }
    }
}
