// thread_pool.cpp: placeholder, being written
