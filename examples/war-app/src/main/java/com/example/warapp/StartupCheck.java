package com.example.warapp;

import jakarta.servlet.ServletContextEvent;
import jakarta.servlet.ServletContextListener;
import jakarta.servlet.annotation.WebListener;

/** Fails the context's start in a release built with -Dbroken=true (the broken 3.0.0). */
@WebListener
public class StartupCheck implements ServletContextListener {
    @Override
    public void contextInitialized(ServletContextEvent event) {
        if (Boolean.parseBoolean(Release.load().getProperty("broken"))) {
            throw new IllegalStateException("war-app: this release is broken on purpose");
        }
    }
}
